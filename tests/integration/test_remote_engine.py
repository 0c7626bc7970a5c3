"""An engine that is not this machine: a second dockerd in a network namespace of its own, reached over tcp://.

The test makes a namespace, a veth pair with a /30 of its own (10.213.N.1 here, 10.213.N.2 there) and starts
dockerd inside with its own data root, exec root, socket and config. That namespace has no route out, so
everything the build needs comes from this side of the veth: the base is bootstrapped here and imported
through the API, pip and apt go through the package proxy listening on 10.213.N.1. The TensorFlow CPU cell
is built and certified there; then the engine, the namespace, the veth and the data root are removed, also
when the test fails. Time: about 15 s for the engine to answer, 1-3 min of debootstrap, 3-7 min of build and
about 1 min of certify on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from builder.engine import Engine
from builder.state import State

from .conftest import REPOSITORY, ROOT

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TF_CPU = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
TF_CPU_TAG = f"{REPOSITORY}/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
ENGINE_PORT = 2375
ANSWER_S = 90  # dockerd on TCP without TLS waits about 15 s before it answers


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a network namespace and start dockerd"
    for tool in ("ip", "nsenter", "dockerd", "debootstrap"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def _sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def _free_subnet() -> int:
    """N for a 10.213.N.0/30 that no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for n in [100 + (os.getpid() + i) % 150 for i in range(150)]:
        if f" 10.213.{n}." not in used:
            return n
    raise RuntimeError("no free 10.213.N.0/30 for the test's veth pair")


@dataclass
class NamespacedEngine:
    """A dockerd in its own network namespace; `close()` removes everything it made, whatever state it is in."""

    root: Path
    netns: str
    veth: str
    host_ip: str
    engine_ip: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"tcp://{self.engine_ip}:{ENGINE_PORT}"

    @classmethod
    def start(cls) -> NamespacedEngine:
        n = _free_subnet()
        tag = f"{os.getpid() % 100000}"
        # A short root: containerd's socket lives under the exec root and socket paths are limited to 108 bytes.
        root = Path(tempfile.mkdtemp(prefix="brt-", dir="/tmp"))
        self = cls(root=root, netns=f"builder-rt-{tag}", veth=f"brt{tag}a", host_ip=f"10.213.{n}.1",
                   engine_ip=f"10.213.{n}.2")
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def _up(self) -> None:
        peer = self.veth[:-1] + "b"
        _sh("ip", "netns", "add", self.netns)
        _sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", self.netns)
        _sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth)
        _sh("ip", "link", "set", self.veth, "up")
        _sh("ip", "-n", self.netns, "addr", "add", f"{self.engine_ip}/30", "dev", peer)
        _sh("ip", "-n", self.netns, "link", "set", peer, "up")
        _sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        (self.root / "daemon.json").write_text("{}\n")  # not the main engine's /etc/docker/daemon.json
        log = (self.root / "dockerd.log").open("wb")
        # nsenter, not `ip netns exec`: the latter remounts /sys and dockerd then finds no devices cgroup.
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.netns}", "dockerd", "--config-file", str(self.root / "daemon.json"),
             "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", f"unix://{self.root / 'docker.sock'}",
             "-H", f"tcp://{self.engine_ip}:{ENGINE_PORT}", "--bridge", "none", "--iptables=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + ANSWER_S
        while True:
            try:
                docker.DockerClient(base_url=self.address, timeout=5).ping()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "dockerd.log").read_text(errors="replace").splitlines()[-5:]
                    raise RuntimeError(f"dockerd in {self.netns} did not answer at {self.address}: {tail}") from None
                time.sleep(1)

    def _ours(self) -> list[int]:
        """Processes this engine started (containerd, shims): their command lines name its private root."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()):
                try:
                    if str(self.root).encode() in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        for pid in self._ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)  # its peer goes with it
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def remote() -> Iterator[NamespacedEngine]:
    reason = _missing()
    if reason:
        pytest.skip(f"no second engine in a network namespace: {reason}")
    engine = NamespacedEngine.start()
    try:
        yield engine
    finally:
        engine.close()
        assert not Path(f"/var/run/netns/{engine.netns}").exists() and not engine.root.exists()


def cli(remote: NamespacedEngine, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    matrix = tmp / "matrix.yaml"
    if not matrix.exists():
        text = (ROOT / "matrix.yaml").read_text()
        matrix.write_text(text.replace("repository: builder\n", f"repository: {REPOSITORY}\n", 1))
    extra = ["--state", str(tmp / "state")] + (["--cache-dir", str(tmp / "cache")] if args[0] == "build" else [])
    env = {**os.environ, "CI": "1", "DOCKER_HOST": remote.address}
    env.pop("DOCKER_CONTEXT", None)
    return subprocess.run([sys.executable, "-m", "builder", "--matrix", str(matrix), *args, *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)


def test_the_namespace_has_no_route_out(remote):
    """The control: what the build gets, it can only get through this side of the veth."""
    probe = ("import socket\ntry:\n socket.create_connection(('pypi.org', 443), timeout=5)\n print('out')\n"
             "except OSError as exc:\n print('none', exc)")
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{remote.netns}", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("none"), out
    with socket.create_connection((remote.engine_ip, ENGINE_PORT), timeout=5):
        pass  # while this side reaches the engine


def test_build_and_certify_on_an_engine_in_another_network_namespace(remote, tmp_path):
    started = time.monotonic()
    built = cli(remote, tmp_path, "build", *TF_CPU)
    build_s = time.monotonic() - started
    assert built.returncode == 0, f"build exited {built.returncode}:\n{built.stdout}\n{built.stderr[-3000:]}"
    assert f"package proxy on {remote.host_ip}" in built.stderr  # the veth address, not 127.0.0.1 nor 0.0.0.0
    assert "bootstrapped" in built.stderr  # the base went in through the API

    record = State(tmp_path / "state").read_record(TF_CPU_TAG)
    assert record is not None and record["upstream_bytes"] > 100_000_000, record
    assert any(line.lower().replace("_", "-") == "tensorflow-cpu==2.18.0" for line in record["lock"]), record["lock"]
    engine = Engine(docker.DockerClient(base_url=remote.address, timeout=120), remote.address)
    image = engine.image(TF_CPU_TAG)
    assert image is not None and image.id == record["image_id"]
    # The proxy's address reached apt through predefined build args: in no layer's history, not in the config.
    assert not any(remote.host_ip in e for e in image.env)
    history = json.dumps(engine.history(image.id))
    assert remote.host_ip not in history and "http_proxy" not in history

    started = time.monotonic()
    certified = cli(remote, tmp_path, "certify", *TF_CPU)
    certify_s = time.monotonic() - started
    assert certified.returncode == 0, f"certify exited {certified.returncode}:\n{certified.stdout}\n{certified.stderr[-3000:]}"
    cert = State(tmp_path / "state").read_certificate(TF_CPU_TAG)
    assert cert is not None and cert["level"] == "cpu-verified", cert
    print(f"remote engine: build {build_s:.0f} s ({record['upstream_bytes'] / 1e6:.0f} MB fetched, "
          f"{record['cached_bytes'] / 1e6:.0f} MB from cache), certify {certify_s:.0f} s")
