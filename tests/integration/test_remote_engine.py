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

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from builder.engine import Engine
from builder.state import State

from .conftest import REPOSITORY, ROOT
from .private_engine import ENGINE_PORT, NamespacedEngine, missing

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TF_CPU = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
TF_CPU_TAG = f"{REPOSITORY}/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"


@pytest.fixture(scope="module")
def remote() -> Iterator[NamespacedEngine]:
    reason = missing()
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
