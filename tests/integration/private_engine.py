"""A private dockerd in a network namespace of its own, reached over tcp:// across a veth pair.

Tests that stop, fill or share an engine use one of these, never the engine the other tests use. The namespace
has a /30 of its own (10.213.N.1 on this side, 10.213.N.2 there) and no route out; dockerd runs with its own data
root, exec root, socket and config. `close()` removes the engine, its processes and mounts, the namespace, the
veth and the data root, whatever state they are in.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker

ENGINE_PORT = 2375
_serial = itertools.count()
ANSWER_S = 90  # dockerd on TCP without TLS waits about 15 s before it answers


def missing() -> str | None:
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
    data_size: str | None = None  # a tmpfs of this size as the data root, for a disk that fills up
    insecure_registries: tuple[str, ...] = ()  # daemon.json insecure-registries: hosts or CIDRs spoken to over http
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"tcp://{self.engine_ip}:{ENGINE_PORT}"

    @classmethod
    def start(cls, data_size: str | None = None, insecure_registries: tuple[str, ...] = ()) -> NamespacedEngine:
        n = _free_subnet()
        tag = f"{os.getpid() % 100000}{next(_serial)}"  # unique per engine, even several in one process
        # A short root: containerd's socket lives under the exec root and socket paths are limited to 108 bytes.
        root = Path(tempfile.mkdtemp(prefix="brt-", dir="/tmp"))
        self = cls(root=root, netns=f"builder-rt-{tag}", veth=f"brt{tag}a", host_ip=f"10.213.{n}.1",
                   engine_ip=f"10.213.{n}.2", data_size=data_size, insecure_registries=insecure_registries)
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
        if self.data_size is not None:
            (self.root / "data").mkdir()
            _sh("mount", "-t", "tmpfs", "-o", f"size={self.data_size}", "builder-test-data", str(self.root / "data"))
        config = {"insecure-registries": list(self.insecure_registries)} if self.insecure_registries else {}
        (self.root / "daemon.json").write_text(json.dumps(config) + "\n")  # not the main engine's daemon.json
        self._dockerd()

    def restart(self) -> None:
        """Start dockerd again on the same data root (after `stop()`), as an operator would after a crash."""
        self.stop()
        self._dockerd()

    def _dockerd(self) -> None:
        log = (self.root / "dockerd.log").open("ab")  # appended: a restart keeps the crashed run's log
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

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the engine as a crash or an operator would, without cleaning up after it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

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
