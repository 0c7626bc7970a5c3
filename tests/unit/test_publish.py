"""Publishing without a registry: tag rules, the retry policy, errors inside the push stream, aliases."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from builder import tags
from builder.certify import digest as cert_digest
from builder.engine import CERT_DIGEST, HASH, LEVEL, TAG, Engine, ImageInfo
from builder.errors import MatrixError, RegistryError
from builder.matrix import expand, load_matrix
from builder.matrix.aliases import assign
from builder.publish import compare_certificates, env_key, push_one, target, verify_certificate
from builder.registry import Manifest, cert_tag, classify, is_loopback, split_reference, with_retries
from builder.state import State

REG = "127.0.0.1:5000"


# ------------------------------------------------------------------------------------------- tags
@pytest.mark.parametrize("value", ["127.0.0.1:5000", "localhost:5000/team", "registry.example.com/ml/prod",
                                   "[::1]:5000", "ghcr.io/org"])
def test_good_registries(value: str) -> None:
    assert tags.registry_problem(value) is None


@pytest.mark.parametrize("value, words", [
    ("team", "must start with a registry host"),  # no host: Docker would read it as Docker Hub's namespace
    ("127.0.0.1:5000/Team", "namespace component 'Team'"),
    ("registry.example.com/a//b", "namespace component ''"),
    ("https://registry.example.com", "must start with a registry host"),
])
def test_bad_registries(value: str, words: str) -> None:
    problem = tags.registry_problem(value)
    assert problem is not None and words in problem


def test_registry_comes_from_flag_then_matrix_then_environment() -> None:
    assert tags.choose_registry("a.io/x", "b.io", "c.io") == ("a.io/x", "--registry")
    assert tags.choose_registry(None, "b.io/", "c.io") == ("b.io", "matrix.yaml registry:")
    assert tags.choose_registry("", None, "c.io:5000") == ("c.io:5000", "$BUILDER_REGISTRY")
    assert tags.choose_registry(None, None, None) is None
    with pytest.raises(tags.InvalidName, match=r"^\$BUILDER_REGISTRY: registry 'Bad'"):
        tags.choose_registry(None, None, "Bad")


def test_remote_repository_keeps_todays_scheme_under_the_registry() -> None:
    assert tags.remote_repository("127.0.0.1:5000/team", "builder/torch") == "127.0.0.1:5000/team/builder/torch"
    with pytest.raises(tags.InvalidName):
        tags.remote_repository("r.io", "x" * 300)


def test_immutable_tag_changes_with_content_and_certificate() -> None:
    h, c = "ab" * 32, "sha256:" + "cd" * 32
    tag = tags.immutable_tag(h, c)
    assert tag == "src-abababababababab-cert-cdcdcdcdcdcdcdcd" and tags.tag_problem(tag) is None
    assert tags.immutable_tag(h, "sha256:" + "ce" * 32) != tag  # a re-certified image gets a new one
    assert tags.immutable_tag("ac" * 32, c) != tag
    with pytest.raises(tags.InvalidName):
        tags.immutable_tag("short", c)


def test_alias_templates() -> None:
    assert tags.alias_problem("latest-cuda{cuda}-py{python}") is None
    assert "unknown placeholder {os}" in str(tags.alias_problem("latest-{os}"))
    assert "may hold only" in str(tags.alias_problem("latest {cuda}"))
    assert tags.alias_tag("{minor}-cuda{cuda}", {"minor": "2.4", "cuda": "12.1"}) == "2.4-cuda12.1"


# --------------------------------------------------------------------------------- retry and errors
@pytest.mark.parametrize("message, retryable, words", [
    ('Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused', False, "nothing answers"),
    ("unauthorized: authentication required", False, "requires a login: run `docker login 127.0.0.1:5000`"),
    ("no basic auth credentials", False, "requires a login"),
    ("denied: requested access to the resource is denied", False, "denied"),
    ("unsupported: The operation is unsupported.", False, "refuses writes"),
    ("status 405 Method Not Allowed: UNSUPPORTED", False, "refuses writes"),
    ("read tcp 127.0.0.1:4000->127.0.0.1:5000: read: connection reset by peer", True, "failed during"),
    ("received unexpected HTTP status: 503 Service Unavailable", True, "failed during"),
    ("status 500 Internal Server Error: unknown", True, "failed during"),
    ("Patch http://127.0.0.1:5000/v2/x/blobs/uploads/1: EOF", True, "failed during"),
    ("manifest invalid: manifest invalid", False, "failed during"),
])
def test_classify(message: str, retryable: bool, words: str) -> None:
    err = classify(message, REG, "the push of x")
    assert err.retryable is retryable
    assert words in str(err) and "\n" not in str(err)


def test_retries_transient_failures_with_backoff_then_succeeds() -> None:
    waits: list[float] = []
    calls = iter([RegistryError("reset", True), RegistryError("503", True), "sha256:ok"])

    def call() -> str:
        got = next(calls)
        if isinstance(got, Exception):
            raise got
        return got

    assert with_retries(call, sleep=waits.append) == "sha256:ok"
    assert waits == [1.0, 2.0]


def test_does_not_retry_a_client_error() -> None:
    waits: list[float] = []
    count = 0

    def call() -> str:
        nonlocal count
        count += 1
        raise RegistryError("denied", False)

    with pytest.raises(RegistryError, match="denied"):
        with_retries(call, sleep=waits.append)
    assert count == 1 and waits == []


def test_gives_up_after_the_last_attempt() -> None:
    waits: list[float] = []

    def call() -> str:
        raise RegistryError("503", True)

    with pytest.raises(RegistryError):
        with_retries(call, attempts=3, sleep=waits.append)
    assert waits == [1.0, 2.0]


class FakeApi:
    """Only the push stream: the SDK yields the engine's events and raises nothing for an error in them."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def push(self, repo: str, tag: str, stream: bool, decode: bool) -> Any:
        return iter(self.events)


def engine_with(events: list[dict[str, Any]]) -> Engine:
    return Engine(SimpleNamespace(api=FakeApi(events)), "unix:///fake")  # type: ignore[arg-type]


def test_push_stream_error_is_detected() -> None:
    events = [{"status": "The push refers to repository [127.0.0.1:5000/b/tf]"},
              {"status": "Preparing", "id": "abc"},
              {"errorDetail": {"message": "unauthorized: authentication required"},
               "error": "unauthorized: authentication required"}]
    with pytest.raises(RegistryError, match="requires a login") as err:
        engine_with(events).push(f"{REG}/b/tf:1")
    assert not err.value.retryable


def test_push_stream_digest() -> None:
    digest = "sha256:" + "1" * 64
    events = [{"status": "Layer already exists", "id": "abc"},
              {"status": f"1: digest: {digest} size: 1234"},
              {"aux": {"Tag": "1", "Digest": digest, "Size": 1234}}]
    assert engine_with(events).push(f"{REG}/b/tf:1") == digest


def test_push_stream_without_a_digest_is_a_failure() -> None:
    with pytest.raises(RegistryError, match="no digest"):
        engine_with([{"status": "Preparing"}]).push(f"{REG}/b/tf:1")


# ------------------------------------------------------------------------------------ small helpers
def test_references_and_cosign_tag() -> None:
    assert split_reference("127.0.0.1:5000/a/b:1.0") == ("127.0.0.1:5000", "a/b", "1.0")
    assert split_reference("r.io/a/b@sha256:ff") == ("r.io", "a/b", "sha256:ff")
    assert cert_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64 + ".cert"
    assert tags.tag_problem(cert_tag("sha256:" + "a" * 64)) is None
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5000")
    assert not is_loopback("registry.example.com:5000") and not is_loopback("10.0.0.1")


def certificate(level: str = "cpu-verified") -> dict[str, Any]:
    digest = cert_digest
    cert: dict[str, Any] = {"level": level, "image": {"id": "sha256:i", "content_hash": "h" * 64},
                            "checks": [{"name": "train.cpu.mlp", "status": "pass"}, {"name": "gpu", "status": "skip"}]}
    cert["digest"] = digest(cert)
    return cert


def test_verify_certificate_against_labels() -> None:
    from builder.engine import TAG

    cert = certificate()
    labels = {CERT_DIGEST: cert["digest"], LEVEL: "cpu-verified", HASH: "h" * 64, TAG: "b/tf:1"}
    assert verify_certificate(cert, labels, "b/tf:1") is None
    assert "carries certificate" in str(verify_certificate(cert, {**labels, CERT_DIGEST: "sha256:x"}, "b/tf:1"))
    assert "content hash" in str(verify_certificate(cert, {**labels, HASH: "other"}, "b/tf:1"))
    tampered = {**cert, "level": "gpu-certified"}
    assert "own digest" in str(verify_certificate(tampered, labels, "b/tf:1"))


def test_compare_certificates() -> None:
    old, new = certificate(), certificate()
    assert compare_certificates(old, new) == []
    new["checks"][0]["status"] = "fail"
    new["level"] = "failed"
    assert compare_certificates(old, new) == ["level cpu-verified -> failed", "train.cpu.mlp pass -> fail"]


def test_env_key() -> None:
    cell = SimpleNamespace(tag="builder/tensorflow:2.18.0-cpu-py3.11-runtime-debian12")
    assert env_key(cell) == "BUILDER_IMAGE_TENSORFLOW_2_18_0_CPU_PY3_11_RUNTIME_DEBIAN12"  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ aliases
ROOT = Path(__file__).resolve().parents[2]


def matrix_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text((ROOT / "matrix.yaml").read_text() + text)
    return path


def test_alias_names_the_newest_cell_per_cuda_line(tmp_path: Path) -> None:
    path = matrix_with(tmp_path, 'aliases:\n  - tag: "latest-{cuda}"\n    framework: torch\n'
                       '    where: {python: "3.11", flavor: runtime, base: debian12}\n')
    matrix = load_matrix(path)
    cells, _ = expand(matrix)
    chosen = assign(matrix, cells)
    torch = [c for c in cells if c.framework == "torch" and c.python == "3.11" and c.flavor == "runtime"
             and c.base.name == "debian12"]
    assert chosen and set(chosen) <= {c.tag for c in torch}
    for cell in torch:  # each CUDA line's alias is on its newest torch, and only there
        same_line = [c for c in torch if c.cuda == cell.cuda]
        newest = max(same_line, key=lambda c: tuple(int(p) for p in c.version.split(".")))
        assert (f"latest-{cell.cuda or 'cpu'}" in chosen.get(cell.tag, ())) == (cell is newest)


def test_bad_aliases_are_file_line_errors(tmp_path: Path) -> None:
    text = ('registry: "Not A Registry"\naliases:\n  - tag: "latest-{cuda}"\n    framework: torch\n'
            '  - tag: "x {nope}"\n    framework: tensorflow\n')
    path = matrix_with(tmp_path, text)
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    lines = err.value.problems
    n = len((ROOT / "matrix.yaml").read_text().splitlines())
    assert any(line.startswith(f"{path}:{n + 1}: registry: ") for line in lines), lines
    assert any(line.startswith(f"{path}:{n + 3}: aliases.0.tag: ") and "would name" in line for line in lines), lines
    assert any(line.startswith(f"{path}:{n + 5}: aliases.1.tag: ") and "unknown placeholder" in line
               for line in lines), lines


def test_a_refused_connection_is_named_even_inside_a_long_urllib3_message() -> None:
    message = ("HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url: /v2/ (Caused by "
               "NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f0c3c1d2d50>: Failed to "
               "establish a new connection: [Errno 111] Connection refused'))")
    err = classify(message, "127.0.0.1:5999", "the API check")
    assert str(err) == ("nothing answers at 127.0.0.1:5999 (connection refused): start the registry, or fix the "
                        "host:port in --registry")
    assert not err.retryable


# ------------------------------------------------------------------- push orchestration, with fakes

CELL_TAG = "builder/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
IMAGE_DIGEST = "sha256:" + "9" * 64


class PushEngine:
    """The engine's push side: names and pushes (or a failure)."""

    def __init__(self, cert: dict[str, Any], fail: RegistryError | None = None) -> None:
        self.info = ImageInfo(id="sha256:stamped", tags=(CELL_TAG,), size=1, user="", env=(), parent="sha256:tested",
                              created="", labels={CERT_DIGEST: cert["digest"], LEVEL: cert["level"],
                                                  HASH: cert["image"]["content_hash"]})
        self.fail = fail
        self.names: set[str] = set()
        self.pushes: list[str] = []

    def image(self, ref: str) -> ImageInfo | None:
        return self.info if ref in (CELL_TAG, self.info.id) else None

    def tag(self, image_id: str, ref: str) -> None:
        self.names.add(ref)

    def untag(self, ref: str) -> None:
        self.names.discard(ref)

    def push(self, ref: str) -> str:
        self.pushes.append(ref)
        if self.fail is not None:
            raise self.fail
        return IMAGE_DIGEST


class FakeRegistry:
    def __init__(self, fail_certificate: bool = False) -> None:
        self.tags: dict[str, str] = {}
        self.certs: dict[str, dict[str, Any]] = {}
        self.fail_certificate = fail_certificate

    def manifest(self, repo: str, reference: str) -> Manifest | None:
        digest = reference if reference.startswith("sha256:") else self.tags.get(reference)
        body = b'{"config": {"digest": "sha256:stamped"}}'  # the image id is its config's digest
        return Manifest(digest=digest, media_type="m", body=body) if digest else None

    def certificate(self, repo: str, image_digest: str) -> tuple[dict[str, Any], str] | None:
        cert = self.certs.get(image_digest)
        return (cert, "sha256:art") if cert else None

    def push_certificate(self, repo: str, image: Manifest, body: bytes, created: str) -> tuple[str, str]:
        if self.fail_certificate:
            raise RegistryError("127.0.0.1:5000 failed during pushing x (status 500)", True)
        import json as _json

        self.certs[image.digest] = _json.loads(body)
        return cert_tag(image.digest), "sha256:art"


def certified_state(tmp_path: Path) -> tuple[State, dict[str, Any]]:
    state = State(tmp_path)
    cert: dict[str, Any] = {"level": "cpu-verified", "time": "t", "checks": [],
                            "image": {"id": "sha256:tested", "tag": CELL_TAG, "content_hash": "c" * 64}}
    cert["digest"] = cert_digest(cert)
    state.write_certificate(CELL_TAG, cert)
    state.index_certificate(CELL_TAG, cert)
    return state, cert


def dest() -> Any:
    cell = SimpleNamespace(tag=CELL_TAG)
    return target(cell, "127.0.0.1:5000/team")  # type: ignore[arg-type]


def fake_push(engine: PushEngine, registry: FakeRegistry, state: State, registries: Any = None) -> Any:
    # registry.tags follows each push, as a real registry would
    real_push = engine.push

    def push(ref: str) -> str:
        got = real_push(ref)
        registry.tags[ref.rsplit(":", 1)[1]] = got
        return got

    engine.push = push  # type: ignore[method-assign]
    return push_one(engine, registry, state, dest(), require="cpu-verified",  # type: ignore[arg-type]
                    allow_uncertified=False, registries=registries)


def test_push_records_the_digest_beside_the_certificate(tmp_path: Path) -> None:
    state, cert = certified_state(tmp_path)
    engine, registry = PushEngine(cert), FakeRegistry()
    result = fake_push(engine, registry, state)
    assert result.status == "pushed"
    record = state.read_publish(CELL_TAG)
    assert record is not None and record.digest == IMAGE_DIGEST and not record.noop
    assert record.reference == f"127.0.0.1:5000/team/builder/tensorflow@{IMAGE_DIGEST}"
    assert record.tags[0] == "2.18.0-cpu-py3.11-runtime-debian12" and record.tags[1].startswith("src-")
    assert state.index()[CELL_TAG].published.digest == IMAGE_DIGEST  # type: ignore[union-attr]
    assert state.read_certificate(CELL_TAG) == cert  # never inside the certificate
    assert registry.certs[IMAGE_DIGEST] == cert
    assert engine.names == set()  # the registry's names were dropped after the push


def test_a_second_push_of_the_same_image_is_a_no_op(tmp_path: Path) -> None:
    state, cert = certified_state(tmp_path)
    engine, registry = PushEngine(cert), FakeRegistry()
    fake_push(engine, registry, state)
    pushes = len(engine.pushes)
    again = fake_push(engine, registry, state)
    assert again.status == "unchanged" and "already in the registry" in again.detail
    assert len(engine.pushes) == pushes  # nothing was sent
    assert state.read_publish(CELL_TAG).noop  # type: ignore[union-attr]


def test_a_failed_push_records_nothing_and_leaves_no_names(tmp_path: Path) -> None:
    state, cert = certified_state(tmp_path)
    engine = PushEngine(cert, fail=RegistryError("127.0.0.1:5000 denied the push", False))
    with pytest.raises(RegistryError, match="denied"):
        fake_push(engine, FakeRegistry(), state)
    assert state.read_publish(CELL_TAG) is None and state.index()[CELL_TAG].published is None
    assert engine.names == set() and len(engine.pushes) == 1  # a 4xx is not retried


def test_a_failed_certificate_push_records_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("builder.registry.time.sleep", lambda s: None)
    state, cert = certified_state(tmp_path)
    with pytest.raises(RegistryError):
        fake_push(PushEngine(cert), FakeRegistry(fail_certificate=True), state)
    assert state.read_publish(CELL_TAG) is None and state.index()[CELL_TAG].published is None


def test_an_image_whose_label_is_not_its_certificate_is_refused(tmp_path: Path) -> None:
    from builder.errors import NotCertified

    state, cert = certified_state(tmp_path)
    engine = PushEngine(cert)
    engine.info = ImageInfo(**{**engine.info.__dict__, "labels": {CERT_DIGEST: "sha256:other"}})
    with pytest.raises(NotCertified, match="changed since certify"):
        fake_push(engine, FakeRegistry(), state)
    engine = PushEngine(cert)
    engine.info = ImageInfo(**{**engine.info.__dict__, "parent": "sha256:someone-else"})
    with pytest.raises(NotCertified, match="not stamped on the tested image"):
        fake_push(engine, FakeRegistry(), state)
    assert engine.pushes == [] and state.read_publish(CELL_TAG) is None


# ------------------------------------------------- the HTTP client against a registry stand-in on loopback


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers /v2/ with the queued statuses, then 200; counts the requests."""

    statuses: list[int] = []
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        body = b'{"errors": [{"code": "UNAVAILABLE", "message": "try later"}]}' if status != 200 else b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serving(server: http.server.ThreadingHTTPServer) -> Any:
    """Run `server` for a fixture's life, with Flaky's count started afresh."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Flaky.seen = 0
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def flaky() -> Any:
    yield from serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky))


def test_a_503_from_the_registry_is_retried_then_succeeds(flaky: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.registry import Registry

    waits: list[float] = []
    monkeypatch.setattr("builder.registry.time.sleep", waits.append)
    Flaky.statuses = [503]
    Registry(f"127.0.0.1:{flaky.server_port}").ping()
    assert Flaky.seen == 2 and waits == [1.0]


def test_a_403_from_the_registry_is_one_line_and_not_retried(flaky: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.registry import Registry

    monkeypatch.setattr("builder.registry.time.sleep", lambda s: None)
    Flaky.statuses = [403]
    with pytest.raises(RegistryError) as err:
        Registry(f"127.0.0.1:{flaky.server_port}").ping()
    assert Flaky.seen == 1 and not err.value.retryable
    assert str(err.value).startswith(f"127.0.0.1:{flaky.server_port} denied the API check (status 403")


# ------------------------------------------- HTTPS or HTTP, as the engine decides (recorded `docker info` shapes)

# `docker info` RegistryConfig of this project's engine (Docker 20.10, no daemon.json settings).
DEFAULT_ENGINE = {"IndexConfigs": {"docker.io": {"Mirrors": [], "Name": "docker.io", "Official": True,
                                                 "Secure": True}},
                  "InsecureRegistryCIDRs": ["127.0.0.0/8"], "Mirrors": []}
# The test's namespaced engine (20.10.24) started with insecure-registries ["10.213.0.0/16", "registry.internal:5000"].
INSECURE_ENGINE = {
    "AllowNondistributableArtifactsCIDRs": [], "AllowNondistributableArtifactsHostnames": [],
    "InsecureRegistryCIDRs": ["10.213.0.0/16", "127.0.0.0/8"],
    "IndexConfigs": {"docker.io": {"Name": "docker.io", "Mirrors": [], "Secure": True, "Official": True},
                     "registry.internal:5000": {"Name": "registry.internal:5000", "Mirrors": [], "Secure": False,
                                                "Official": False}},
    "Mirrors": []}
NAMES = {"localhost": ["127.0.0.1", "::1"], "lab.example": ["10.213.7.1"], "registry.internal": ["192.0.2.9"],
         "registry.example.com": ["203.0.113.5"]}


def names(name: str) -> list[str]:
    if name not in NAMES:
        raise OSError(f"unknown host {name}")
    return NAMES[name]


@pytest.mark.parametrize(("host", "config", "insecure"), [
    ("127.0.0.1:5000", DEFAULT_ENGINE, True),  # loopback: in the engine's default 127.0.0.0/8
    ("localhost:5000", DEFAULT_ENGINE, True),  # by its address, as Docker resolves it
    ("10.213.7.1:5000", DEFAULT_ENGINE, False),  # the veth address is secure to an engine not told otherwise
    ("10.213.7.1:5000", INSECURE_ENGINE, True),  # ... and insecure to one with 10.213.0.0/16 in its CIDRs
    ("lab.example:5000", INSECURE_ENGINE, True),  # a name whose address is in those CIDRs
    ("registry.internal:5000", INSECURE_ENGINE, True),  # named in IndexConfigs with Secure false
    ("registry.internal:5001", INSECURE_ENGINE, False),  # IndexConfigs names host:port, not the host
    ("registry.example.com", INSECURE_ENGINE, False),
    ("unknown.example:5000", INSECURE_ENGINE, False),  # unresolvable: no CIDR can match, as in Docker
    ("docker.io", INSECURE_ENGINE, False),
    ("127.0.0.1:5000", None, True),  # no engine to ask: loopback only
    ("10.213.7.1:5000", None, False),
])
def test_a_registry_is_insecure_exactly_when_the_engine_treats_it_so(host: str, config: Any, insecure: bool) -> None:
    from builder.registry import engine_insecure

    assert engine_insecure(host, config, resolve=names) is insecure


def test_index_configs_win_over_the_cidrs_as_in_docker() -> None:
    from builder.registry import engine_insecure

    config = {**INSECURE_ENGINE, "IndexConfigs": {"10.213.7.1:5000": {"Name": "10.213.7.1:5000", "Secure": True}}}
    assert not engine_insecure("10.213.7.1:5000", config, resolve=names)
    assert engine_insecure("10.213.7.1:5001", config, resolve=names)


def test_the_client_follows_the_engine_it_is_given() -> None:
    from builder.publish import open_registry

    class InfoOnly:
        def __init__(self, config: dict[str, Any]) -> None:
            self.config = config

        def info(self) -> dict[str, Any]:
            return {"RegistryConfig": self.config}

    assert open_registry("10.213.7.1:5000/team", InfoOnly(INSECURE_ENGINE)).insecure  # type: ignore[arg-type]
    secure = open_registry("10.213.7.1:5000/team", InfoOnly(DEFAULT_ENGINE))  # type: ignore[arg-type]
    assert not secure.insecure and secure.base == "https://10.213.7.1:5000/v2"
    assert open_registry("127.0.0.1:5000", None).insecure


def test_an_insecure_plain_http_registry_is_spoken_to_over_http(flaky: Any) -> None:
    from builder.registry import Registry

    registry = Registry(f"127.0.0.1:{flaky.server_port}", insecure=True)
    registry.ping()
    assert Flaky.seen == 1 and registry.base == f"http://127.0.0.1:{flaky.server_port}/v2"


def test_a_secure_registry_is_never_downgraded_to_http(flaky: Any) -> None:
    from builder.registry import Registry

    with pytest.raises(RegistryError) as err:
        Registry(f"127.0.0.1:{flaky.server_port}", insecure=False).ping()
    assert Flaky.seen == 0  # not one request went over plain HTTP
    assert str(err.value).startswith(f"127.0.0.1:{flaky.server_port} failed the TLS handshake (wrong version number)")
    assert "insecure-registries" in str(err.value) and not err.value.retryable


@pytest.fixture()
def self_signed(tmp_path: Path) -> Any:
    """A registry stand-in over HTTPS with a self-signed certificate, on loopback."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from serving(server)


def test_an_insecure_registry_with_a_self_signed_certificate_keeps_https(self_signed: Any) -> None:
    from builder.registry import Registry

    host = f"127.0.0.1:{self_signed.server_port}"
    registry = Registry(host, insecure=True)
    registry.ping()  # Docker's way for an insecure registry: HTTPS without verification first
    assert registry.base == f"https://{host}/v2" and Flaky.seen == 2  # the scheme probe and the ping
    with pytest.raises(RegistryError, match=r"failed the TLS handshake .*certificate verify failed"):
        Registry(host, insecure=False).ping()


# ------------------------------------------------------- mirroring: pushing an image that `pull` brought here
SOURCE = "src.example:5000"
PULLED_REF = f"{SOURCE}/team/builder/tensorflow@{IMAGE_DIGEST}"


def pulled_engine(cert: dict[str, Any], repo_digests: tuple[str, ...] = (PULLED_REF,)) -> PushEngine:
    engine = PushEngine(cert)
    engine.info = ImageInfo(**{**engine.info.__dict__, "parent": "", "repo_digests": repo_digests,
                               "labels": {**engine.info.labels, TAG: CELL_TAG}})
    return engine


def mirror_push(engine: PushEngine, source: FakeRegistry | Exception, state: State) -> Any:
    def registries(host: str) -> Any:
        assert host == SOURCE
        if isinstance(source, Exception):
            raise source
        return source

    registry = FakeRegistry()
    return fake_push(engine, registry, state, registries), registry


def test_a_pulled_image_confirmed_by_its_source_is_mirrored_with_its_provenance(tmp_path: Path) -> None:
    state, cert = certified_state(tmp_path)
    source = FakeRegistry()
    source.certs[IMAGE_DIGEST] = cert
    result, mirror = mirror_push(pulled_engine(cert), source, state)
    assert result.status == "pushed" and f"mirrored from {PULLED_REF}" in result.detail
    record = state.read_publish(CELL_TAG)
    assert record is not None and record.extra == {"mirrored_from": PULLED_REF}
    assert mirror.certs[IMAGE_DIGEST] == cert  # the certificate travels on with it


@pytest.mark.parametrize(("why", "words"), [
    ("no certificate at the source", "has no certificate beside it"),
    ("another image at the source", "is now another image"),
    ("source down", "nothing answers at src.example:5000"),
    ("never pulled", "it came from no registry either"),
])
def test_a_pulled_image_its_source_does_not_confirm_is_refused(tmp_path: Path, why: str, words: str) -> None:
    from builder.errors import NotCertified

    state, cert = certified_state(tmp_path)
    source: FakeRegistry | Exception = FakeRegistry()
    engine = pulled_engine(cert, () if why == "never pulled" else (PULLED_REF,))
    if why == "another image at the source":
        engine.info = ImageInfo(**{**engine.info.__dict__, "id": "sha256:other"})
        engine.image = lambda ref: engine.info  # type: ignore[method-assign]
    if why == "source down":
        source = classify("connection refused", SOURCE)
    with pytest.raises(NotCertified) as err:
        mirror_push(engine, source, state)
    line = str(err.value)
    assert line.startswith(f"{CELL_TAG}: not pushed: no local parent shows what was tested, and ")
    assert ("cannot confirm it" in line) is (why != "never pulled")
    assert words in line and "\n" not in line
    assert engine.pushes == [] and state.read_publish(CELL_TAG) is None


@pytest.mark.parametrize(("engine_says", "detail"), [
    ('Get "https://10.213.7.1:5000/v2/": http: server gave HTTP response to HTTPS client',
     "server gave http response to https client"),
    ('Get "https://10.213.7.1:5000/v2/": x509: certificate signed by unknown authority',
     "x509: certificate signed by unknown authority"),
])
def test_the_engines_own_tls_failures_name_insecure_registries(engine_says: str, detail: str) -> None:
    err = classify(engine_says, "10.213.7.1:5000", "the push of x")
    assert str(err).startswith(f"10.213.7.1:5000 failed the TLS handshake ({detail}): ")
    assert "insecure-registries" in str(err) and not err.retryable
