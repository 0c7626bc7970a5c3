"""push, resolve and pull against real registries: Debian's docker-registry (distribution 2.8) in containers.

The registry image is built here from the bootstrapped Debian base and the Debian package, and each
registry's life is managed by testcontainers, published on 127.0.0.1 only. One round trip with a real
certified TensorFlow CPU cell, ending with the pulled image mirrored to a second registry, and the faults,
each of which must give one clear line, no traceback, no digest recorded and nothing left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from builder.engine import CERT_DIGEST, HASH, LEVEL, MANAGED, TAG, Engine
from builder.state import State

from .conftest import REPOSITORY, ROOT, Work

pytestmark = [pytest.mark.engine, pytest.mark.slow]
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # its reaper image cannot be pulled here

TF_CPU = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
TF_CPU_TAG = f"{REPOSITORY}/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
REGISTRY_IMAGE = f"{REPOSITORY}/registry:2.8"
USER, PASSWORD = "builder-test", "registry-test-password"  # baked into the test registry's htpasswd


@pytest.fixture(scope="module")
def registry_image(engine: Engine, work: Work) -> str:
    """The registry image: Debian's docker-registry on the bootstrapped base (labelled for the clean-up)."""
    work.cli("base", *TF_CPU, check=True)
    context = ROOT / "tests" / "integration" / "registry"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(context.iterdir()):
            tar.add(path, arcname=path.name)
    buf.seek(0)
    for event in engine.api.build(fileobj=buf, custom_context=True, tag=REGISTRY_IMAGE, pull=False, rm=True,
                                  forcerm=True, decode=True, labels={TAG: REGISTRY_IMAGE}, network_mode="host"):
        assert "error" not in event, event
    return REGISTRY_IMAGE


class Registry:
    """One running registry container on 127.0.0.1 (or another address of this machine), its life held by
    testcontainers."""

    def __init__(self, image: str, config: str = "open", bind: str = "127.0.0.1") -> None:
        from testcontainers.core.container import DockerContainer

        self.bind = bind
        self.container = DockerContainer(image).with_command(f"/etc/registry/{config}.yml")
        self.container.ports["5000/tcp"] = (bind, None)  # that one address only, never every address
        self.container.with_kwargs(labels={MANAGED: "true"})

    def __enter__(self) -> Registry:
        self.container.start()
        self.address = f"{self.bind}:{self.container.get_exposed_port(5000)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://{self.address}/v2/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        self.container.stop()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # already stopped by the test
            self.stop()


@pytest.fixture(scope="module")
def registry(registry_image: str) -> Iterator[Registry]:
    """The registry of the round trip: htpasswd auth, so the round trip also proves the Docker-config login."""
    with Registry(registry_image, "auth") as reg:
        yield reg


@pytest.fixture(scope="module")
def mirror(registry_image: str) -> Iterator[Registry]:
    """An open registry: the uncertified push goes here first, and the pulled image is mirrored here last.

    The order is CI time: the engine has then already sent these layers to this registry (under refused/),
    so the mirror push mounts them instead of gzipping 1.4 GB a second time (about 100 s on 2 cores).
    """
    with Registry(registry_image, "open") as reg:
        yield reg


@pytest.fixture(scope="module")
def login(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A Docker config logged in to `registry` by `docker login`, the only writer of credentials here."""
    config = tmp_path_factory.mktemp("docker-config")
    env = {"DOCKER_CONFIG": str(config)}
    proc = subprocess.run(["docker", "login", "-u", USER, "--password-stdin", registry.address], input=PASSWORD,
                          text=True, capture_output=True, env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return env


@pytest.fixture(scope="module")
def certified(engine: Engine, work: Work) -> dict:
    """The TF CPU cell, built and certified in this session.

    These tests are about the registry, not the build: an image of the cell that test_canary built a
    moment ago in this session (same cell, same content hash) is used as it is, saving CI a 1.5 GB build.
    """
    proc = work.cli("build", *TF_CPU, check=True)
    assert "built" in proc.stdout or "up to date" in proc.stdout, proc.stdout
    work.cli("certify", *TF_CPU, check=True)
    return work.certificate(TF_CPU_TAG)


def run(work: Work, *args: str, state: Path | None = None, env: dict[str, str] | None = None):
    return work.cli(*args, "--state", str(state or work.state), env=env) if args[0] != "resolve" else \
        work.cli(*args, env=env)


def one_clean_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr: exactly one `error:` line and no traceback."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def registry_names(engine: Engine, address: str) -> list[str]:
    """Local names under a registry: a push must not leave its registry-named tags behind."""
    return [t for img in engine.api.images() for t in img.get("RepoTags") or [] if t.startswith(address)]


def test_uncertified_and_mismatched_certificates_are_refused(engine: Engine, work: Work, mirror: Registry,
                                                             login: dict[str, str], certified: dict) -> None:
    assert engine.image(TF_CPU_TAG).labels[CERT_DIGEST] == certified["digest"]  # the built, stamped image
    registry = mirror
    reg = f"{registry.address}/refused"
    # no certificate at all
    empty = work.root / "no-certificates"
    proc = run(work, "push", *TF_CPU, "--registry", reg, state=empty, env=login)
    assert proc.returncode == 8
    assert "no certificate" in one_clean_line(proc)
    assert State(empty).read_publish(TF_CPU_TAG) is None
    # a certificate edited after certify
    changed = work.root / "changed"
    shutil.copytree(work.state, changed)
    shutil.rmtree(changed / "publish", ignore_errors=True)  # the round trip's receipts are not this test's
    cert = State(changed).read_certificate(TF_CPU_TAG)
    cert["level"] = "gpu-certified"
    State(changed).write_certificate(TF_CPU_TAG, cert)
    proc = run(work, "push", *TF_CPU, "--registry", reg, state=changed, env=login)
    assert proc.returncode == 8 and "was changed after certify" in one_clean_line(proc)
    # a certificate that is sound but not the one on the image
    from builder.certify import digest

    cert = dict(certified, time="2000-01-01T00:00:00Z")
    cert["digest"] = digest(cert)
    State(changed).write_certificate(TF_CPU_TAG, cert)
    proc = run(work, "push", *TF_CPU, "--registry", reg, state=changed, env=login)
    assert proc.returncode == 8 and "changed since certify" in one_clean_line(proc)
    # below the required level
    proc = run(work, "push", *TF_CPU, "--registry", reg, "--require", "gpu-certified", env=login)
    assert proc.returncode == 8 and "below the required gpu-certified" in one_clean_line(proc)
    for state in (empty, changed):
        assert State(state).read_publish(TF_CPU_TAG) is None
    # nothing reached the registry, and no registry-named tag is left here
    tags = requests.get(f"http://{registry.address}/v2/refused/{TF_CPU_TAG.rsplit(':', 1)[0]}/tags/list", timeout=10)
    assert tags.status_code == 404
    assert registry_names(engine, registry.address) == []
    # --allow-uncertified pushes, says so, and records nothing
    proc = run(work, "push", *TF_CPU, "--registry", reg, "--allow-uncertified", state=empty, env=login)
    assert proc.returncode == 0, proc.stderr
    assert "--allow-uncertified: pushing anyway" in proc.stderr
    assert State(empty).read_publish(TF_CPU_TAG) is None
    # and resolve will not hand out an image without its certificate
    proc = run(work, "resolve", *TF_CPU, "--registry", reg, env=login)
    assert proc.returncode == 1 and proc.stdout.strip() == ""
    assert "pushed uncertified" in one_clean_line(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_registry_faults_give_one_line_and_record_nothing(engine: Engine, work: Work, registry_image: str,
                                                          registry: Registry, certified: dict, tmp_path: Path) -> None:
    assert engine.image(TF_CPU_TAG).labels[CERT_DIGEST] == certified["digest"]  # the built, stamped image
    docker_config = tmp_path / "docker-config"  # a Docker config with no login in it
    docker_config.mkdir()
    no_login = {"DOCKER_CONFIG": str(docker_config)}
    cases = []
    # a stopped registry
    with Registry(registry_image) as stopped:
        address = stopped.address
        stopped.stop()
    cases.append(("stopped", address, no_login, "nothing answers at"))
    # a port where nothing listens
    cases.append(("wrong port", f"127.0.0.1:{free_port()}", no_login, "nothing answers at"))
    cases.append(("no login", registry.address, no_login, "requires a login: run `docker login"))
    with Registry(registry_image, "readonly") as readonly:
        cases.append(("read-only", readonly.address, no_login, "refuses writes"))
        for name, address, env, words in cases:
            state = tmp_path / name
            shutil.copytree(work.state, state)
            shutil.rmtree(state / "publish", ignore_errors=True)
            before = json.loads(State(state).index_path.read_text())
            started = time.monotonic()
            proc = run(work, "push", *TF_CPU, "--registry", address, state=state, env=env)
            line = one_clean_line(proc)
            print(f"{name}: exit {proc.returncode} in {time.monotonic() - started:.1f} s: {line}")
            assert proc.returncode == 7, (name, proc.stderr)
            assert words in line, (name, line)
            assert State(state).read_publish(TF_CPU_TAG) is None, name
            assert json.loads(State(state).index_path.read_text()) == before, name
            assert registry_names(engine, address) == [], name


# Last: it removes the built image; what is pulled back is then mirrored to a second registry.
def test_round_trip(engine: Engine, work: Work, registry: Registry, login: dict[str, str], certified: dict,
                    mirror: Registry, tmp_path: Path) -> None:
    reg = registry.address
    started = time.monotonic()
    proc = run(work, "push", *TF_CPU, "--registry", f"{reg}/team", env=login)
    first = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "pushed" in proc.stdout
    record = work.store.read_publish(TF_CPU_TAG)
    assert record is not None and record.certificate_digest == certified["digest"] and not record.noop
    repo = f"{reg}/team/{TF_CPU_TAG.rsplit(':', 1)[0]}"
    assert record.reference.startswith(f"{repo}@sha256:")
    entry = work.store.index()[TF_CPU_TAG]
    assert entry.published is not None and entry.published.reference == record.reference
    assert work.certificate(TF_CPU_TAG) == certified  # the digest is beside the certificate, never in it
    assert registry_names(engine, reg) == []
    # the registry holds the immutable tag and the certificate under cosign's tag
    path = repo.split("/", 1)[1]
    immutable = next(t for t in record.tags if t.startswith("src-"))
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    auth = (USER, PASSWORD)
    got = requests.get(f"http://{reg}/v2/{path}/manifests/{immutable}", headers=accept, auth=auth, timeout=10)
    assert got.headers["Docker-Content-Digest"] == record.digest
    cert_tag = "sha256-" + record.digest.split(":")[1] + ".cert"
    art = requests.get(f"http://{reg}/v2/{path}/manifests/{cert_tag}",
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, auth=auth, timeout=10).json()
    assert art["subject"]["digest"] == record.digest
    blob = requests.get(f"http://{reg}/v2/{path}/blobs/{art['layers'][0]['digest']}", auth=auth, timeout=10).json()
    assert blob == certified

    # a second push of the same image is a no-op, and says so
    started = time.monotonic()
    again = run(work, "push", *TF_CPU, "--registry", f"{reg}/team", env=login)
    noop = time.monotonic() - started
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr
    assert work.store.read_publish(TF_CPU_TAG).noop
    print(f"push {first:.1f} s, no-op push {noop:.1f} s")

    # remove every local image of the cell; resolve asks the registry alone
    engine.remove_images_with_label(TAG, TF_CPU_TAG)  # the stamped image and the tested one under it
    assert engine.image(TF_CPU_TAG) is None and engine.images_with_label(TAG, TF_CPU_TAG, all_images=True) == []
    text = run(work, "resolve", *TF_CPU, "--registry", f"{reg}/team", env=login)
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == record.reference
    js = json.loads(run(work, "resolve", *TF_CPU, "--registry", f"{reg}/team", "--format", "json", env=login).stdout)
    assert js == [{"tag": TF_CPU_TAG, "reference": record.reference, "level": "cpu-verified",
                   "certificate": certified["digest"]}]
    env = run(work, "resolve", *TF_CPU, "--registry", f"{reg}/team", "--format", "env", env=login).stdout.strip()
    assert env == f"BUILDER_IMAGE_TENSORFLOW_2_18_0_CPU_PY3_11_RUNTIME_DEBIAN12={record.reference}"

    # pull by digest, into an engine without the image and a state that never saw the cell, checks the labels
    # against the certificate
    elsewhere = work.root / "elsewhere"
    started = time.monotonic()
    pulled = run(work, "pull", *TF_CPU, "--registry", f"{reg}/team", state=elsewhere, env=login)
    pull_s = time.monotonic() - started
    assert pulled.returncode == 0, pulled.stderr
    assert "verified" in pulled.stdout
    # the reference is one that `docker pull` accepts (asked after the pull above: the bytes come down once)
    docker_pull = subprocess.run(["docker", "pull", record.reference], capture_output=True, text=True, timeout=600,
                                 env={**os.environ, **login})
    assert docker_pull.returncode == 0 and record.digest in docker_pull.stdout, docker_pull.stderr
    info = engine.image(TF_CPU_TAG)
    assert info is not None and info.labels[CERT_DIGEST] == certified["digest"]
    assert info.labels[HASH] == certified["image"]["content_hash"] and info.labels[LEVEL] == "cpu-verified"
    assert State(elsewhere).read_certificate(TF_CPU_TAG) == certified
    # and --recertify runs the smoke test again on the pulled image: the same level and checks
    started = time.monotonic()
    recert = run(work, "pull", *TF_CPU, "--registry", f"{reg}/team", "--recertify", state=elsewhere, env=login)
    recert_s = time.monotonic() - started
    assert recert.returncode == 0, recert.stderr
    assert "recertified" in recert.stdout
    assert engine.image(TF_CPU_TAG).id == info.id  # the scratch stamp of the re-run is not kept
    print(f"pull {pull_s:.1f} s, pull --recertify {recert_s:.1f} s")

    # The pulled image has no local parent to show what was tested. It is mirrored to a second registry only
    # once the registry it came from confirms that very image with that certificate beside it.
    no_login = tmp_path / "no-login"
    no_login.mkdir()
    refused = run(work, "push", *TF_CPU, "--registry", f"{mirror.address}/mirror", state=elsewhere,
                  env={"DOCKER_CONFIG": str(no_login)})
    line = one_clean_line(refused)
    assert refused.returncode == 8 and "the registry it was pulled from cannot confirm it" in line, line
    assert "requires a login" in line, line
    assert State(elsewhere).read_publish(TF_CPU_TAG) is None
    mirror_repo = f"{mirror.address}/mirror/{TF_CPU_TAG.rsplit(':', 1)[0]}"
    mirror_path = mirror_repo.split("/", 1)[1]
    assert requests.get(f"http://{mirror.address}/v2/{mirror_path}/tags/list", timeout=10).status_code == 404
    started = time.monotonic()
    mirrored = run(work, "push", *TF_CPU, "--registry", f"{mirror.address}/mirror", state=elsewhere, env=login)
    mirror_s = time.monotonic() - started
    assert mirrored.returncode == 0, mirrored.stderr
    assert f"mirrored from {record.reference}" in mirrored.stderr
    copy = State(elsewhere).read_publish(TF_CPU_TAG)
    assert copy is not None and copy.extra == {"mirrored_from": record.reference}
    assert copy.reference.startswith(f"{mirror_repo}@sha256:") and copy.image_id == info.id
    # the mirror holds this very image (its config is the image id) with the same certificate beside it
    manifest = requests.get(f"http://{mirror.address}/v2/{mirror_path}/manifests/{copy.digest}", headers=accept,
                            timeout=10).json()
    assert manifest["config"]["digest"] == info.id
    mirror_cert = f"sha256-{copy.digest.split(':')[1]}.cert"
    art = requests.get(f"http://{mirror.address}/v2/{mirror_path}/manifests/{mirror_cert}", timeout=10,
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert requests.get(f"http://{mirror.address}/v2/{mirror_path}/blobs/{art['layers'][0]['digest']}",
                        timeout=10).json() == certified
    assert run(work, "resolve", *TF_CPU, "--registry", f"{mirror.address}/mirror").stdout.strip() == copy.reference
    assert registry_names(engine, mirror.address) == []
    print(f"mirror push {mirror_s:.1f} s")
    for path in [*work.state.rglob("*"), *elsewhere.rglob("*")]:  # the tool wrote no credential anywhere
        assert not path.is_file() or PASSWORD not in path.read_text(errors="replace"), path
