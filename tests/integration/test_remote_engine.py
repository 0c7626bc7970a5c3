"""An engine that is not this machine: a second dockerd in a network namespace of its own, reached over tcp://.

The test makes a namespace, a veth pair with a /30 of its own (10.213.N.1 here, 10.213.N.2 there) and starts
dockerd inside with its own data root, exec root, socket and config. That namespace has no route out, so
everything the build needs comes from this side of the veth: the base is bootstrapped here and imported
through the API, pip and apt go through the package proxy listening on 10.213.N.1. The TensorFlow CPU cell
is built and certified there, then pushed over tcp:// to a registry that this side publishes on 10.213.N.1 only
(the engine is told 10.213.0.0/16 is insecure, so it and builder's own registry client speak plain HTTP to it),
resolved, and pulled by digest through that engine. Then the engine, the namespace, the veth and the data root
are removed, also when the test fails. Time: about 15 s for the engine to answer, 1-3 min of debootstrap, 3-7 min
of build, about 1 min of certify, about 2 min of push (the engine gzips 1.4 GB on 2 cores) and seconds of pull.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from builder.engine import CERT_DIGEST, HASH, LEVEL, Engine
from builder.state import State

from .conftest import REPOSITORY, ROOT
from .private_engine import ENGINE_PORT, NamespacedEngine, missing
from .test_publish import Registry, one_clean_line, registry_image  # noqa: F401  (registry_image: a fixture)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TF_CPU = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
TF_CPU_TAG = f"{REPOSITORY}/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"


@pytest.fixture(scope="module")
def remote() -> Iterator[NamespacedEngine]:
    reason = missing()
    if reason:
        pytest.skip(f"no second engine in a network namespace: {reason}")
    # The test's own addresses only: every registry on a 10.213.N.1 is plain HTTP to this engine.
    engine = NamespacedEngine.start(insecure_registries=("10.213.0.0/16",))
    try:
        yield engine
    finally:
        engine.close()
        assert not Path(f"/var/run/netns/{engine.netns}").exists() and not engine.root.exists()


@pytest.fixture(scope="module")
def remote_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The state of the remote engine's build, certify and push: one for the module, as one user's checkout.
    Its package cache (1.6 GB) goes with the module: pytest keeps its last three roots."""
    tmp = tmp_path_factory.mktemp("remote")
    yield tmp
    shutil.rmtree(tmp / "cache", ignore_errors=True)


def cli(remote: NamespacedEngine | None, tmp: Path, *args: str, state: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """`builder ARGS` against `remote` (None: this machine's own engine)."""
    matrix = tmp / "matrix.yaml"
    if not matrix.exists():
        text = (ROOT / "matrix.yaml").read_text()
        matrix.write_text(text.replace("repository: builder\n", f"repository: {REPOSITORY}\n", 1))
    extra = [] if args[0] == "resolve" else ["--state", str(state or tmp / "state")]
    extra += ["--cache-dir", str(tmp / "cache")] if args[0] == "build" else []
    env = {**os.environ, "CI": "1"}
    if remote is not None:
        env["DOCKER_HOST"] = remote.address
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


def test_build_and_certify_on_an_engine_in_another_network_namespace(remote, remote_tmp):
    tmp_path = remote_tmp
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


def test_push_resolve_and_pull_through_the_remote_engine(remote, remote_tmp, registry_image):  # noqa: F811
    """Push over tcp:// to a registry the remote engine treats as insecure, then resolve and pull it there.

    The registry runs on this machine's engine, published on the veth's host side only: the remote engine
    reaches it there, and so does builder's registry client (for the certificate artifact), over plain HTTP
    because the engine was told that address is insecure. The same registry is not downgraded for an engine
    that treats it as secure (this machine's own).
    """
    cert = State(remote_tmp / "state").read_certificate(TF_CPU_TAG)
    assert cert is not None, "the build-and-certify test above must have run"
    with Registry(registry_image, "open", bind=remote.host_ip) as registry:
        reg = f"{registry.address}/remote"
        started = time.monotonic()
        pushed = cli(remote, remote_tmp, "push", *TF_CPU, "--registry", reg)
        push_s = time.monotonic() - started
        assert pushed.returncode == 0, f"push exited {pushed.returncode}:\n{pushed.stdout}\n{pushed.stderr[-3000:]}"
        record = State(remote_tmp / "state").read_publish(TF_CPU_TAG)
        assert record is not None and record.certificate_digest == cert["digest"], record
        repo = f"{reg}/{TF_CPU_TAG.rsplit(':', 1)[0]}"
        assert record.reference.startswith(f"{repo}@sha256:")
        # the certificate artifact went in beside it, over the same plain HTTP the engine used
        path = repo.split("/", 1)[1]
        cert_tag = "sha256-" + record.digest.split(":")[1] + ".cert"
        art = requests.get(f"http://{registry.address}/v2/{path}/manifests/{cert_tag}", timeout=10,
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        assert art["subject"]["digest"] == record.digest
        blob = requests.get(f"http://{registry.address}/v2/{path}/blobs/{art['layers'][0]['digest']}", timeout=10)
        assert blob.json() == cert

        # resolve through the remote engine's settings gives the reference ...
        resolved = cli(remote, remote_tmp, "resolve", *TF_CPU, "--registry", reg)
        assert resolved.returncode == 0 and resolved.stdout.strip() == record.reference, resolved.stderr
        # ... while this machine's engine treats that address as secure: builder asks it over verified HTTPS,
        # and says how to mark the registry insecure instead of quietly falling back to HTTP
        secure = cli(None, remote_tmp, "resolve", *TF_CPU, "--registry", reg)
        assert secure.returncode != 0 and secure.stdout.strip() == ""
        assert "failed the TLS handshake" in one_clean_line(secure) and "insecure-registries" in secure.stderr

        # pull by digest through the remote engine into a state that never saw the cell. The engine keeps its
        # layers (test_publish pulls the bytes into an engine without them; here that would add about 40 s)
        elsewhere = remote_tmp / "elsewhere"
        started = time.monotonic()
        pulled = cli(remote, remote_tmp, "pull", *TF_CPU, "--registry", reg, state=elsewhere)
        pull_s = time.monotonic() - started
        assert pulled.returncode == 0, f"pull exited {pulled.returncode}:\n{pulled.stdout}\n{pulled.stderr[-3000:]}"
        assert "verified" in pulled.stdout
        engine = Engine(docker.DockerClient(base_url=remote.address, timeout=300), remote.address)
        info = engine.image(TF_CPU_TAG)
        assert info is not None and record.reference in info.repo_digests  # the engine pulled it by that digest
        assert info.labels[CERT_DIGEST] == cert["digest"] and info.labels[HASH] == cert["image"]["content_hash"]
        assert info.labels[LEVEL] == "cpu-verified"
        assert State(elsewhere).read_certificate(TF_CPU_TAG) == cert
    print(f"remote engine: push {push_s:.0f} s, pull {pull_s:.0f} s")
