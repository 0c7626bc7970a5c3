"""The no-op fast path: its key, its stamp, which engines it serves, and what it asks the engine."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder import uptodate

CELL = uptodate.Stamped(tag="b/tf:1-cpu", content_hash="h1", base="debian:bookworm-slim", base_id="sha256:base")


def test_key_follows_the_matrix_and_the_selectors(tmp_path: Path) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("schema: 1\n")
    first = uptodate.key(matrix, ["python=3.11"])
    assert uptodate.key(matrix, ["python=3.11"]) == first
    assert uptodate.key(matrix, ["python=3.12"]) != first
    matrix.write_text("schema: 1\n# edited\n")
    assert uptodate.key(matrix, ["python=3.11"]) != first


def test_key_covers_the_templates_and_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("schema: 1\n")
    package, templates = tmp_path / "builder", tmp_path / "templates"
    (package / "matrix").mkdir(parents=True)
    (templates / "partials").mkdir(parents=True)
    files = [package / "render.py", package / "matrix" / "expand.py", templates / "partials" / "os.j2"]
    for path in files:
        path.write_text("original\n")
    monkeypatch.setattr(uptodate, "PACKAGE", package)
    monkeypatch.setattr(uptodate, "TEMPLATES", templates)
    first = uptodate.key(matrix, [])
    for path in files:
        path.write_text("changed\n")
        assert uptodate.key(matrix, []) != first, path
        path.write_text("original\n")
    assert uptodate.key(matrix, []) == first


def test_stamp_round_trip_and_a_stale_key(tmp_path: Path) -> None:
    uptodate.write_stamp(tmp_path, "k" * 64, [CELL])
    assert uptodate.read_stamp(tmp_path, "k" * 64) == [CELL]
    assert uptodate.read_stamp(tmp_path, "j" * 64) is None
    uptodate.stamp_path(tmp_path, "k" * 64).write_text("{not json")
    assert uptodate.read_stamp(tmp_path, "k" * 64) is None


def test_only_the_default_local_engine_takes_the_fast_path(tmp_path: Path) -> None:
    home = {"DOCKER_CONFIG": str(tmp_path)}
    assert uptodate.local_socket(home) == uptodate.DEFAULT_SOCKET
    assert uptodate.local_socket({**home, "DOCKER_HOST": "unix:///run/d.sock"}) == "/run/d.sock"
    assert uptodate.local_socket({**home, "DOCKER_HOST": "tcp://10.0.0.2:2375"}) is None
    assert uptodate.local_socket({**home, "DOCKER_CONTEXT": "remote"}) is None
    (tmp_path / "config.json").write_text(json.dumps({"currentContext": "remote"}))
    assert uptodate.local_socket(home) is None


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    answers: dict[str, Any]
    asked: list[str]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_Engine]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server: _Engine = self.server  # type: ignore[assignment]
            server.asked.append(self.path)
            path = self.path.split("?")[0]
            if path not in server.answers:
                self.send_error(404)
                return
            body = json.dumps(server.answers[path]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def address_string(self) -> str:
            return "unix"

    server = _Engine(str(tmp_path / "engine.sock"), Handler)
    server.asked = []
    server.answers = {
        "/images/debian%3Abookworm-slim/json": {"Id": "sha256:base"},
        # the image as inspect shows it (labels in its config) and as the listing does
        "/images/b%2Ftf%3A1-cpu/json": {"Id": "sha256:img", "RepoTags": ["b/tf:1-cpu"], "Size": 42,
                                        "Config": {"Labels": {uptodate.HASH_LABEL: "h1"}}},
        "/images/json": [{"Id": "sha256:img", "RepoTags": ["b/tf:1-cpu"], "Size": 42,
                          "Labels": {uptodate.HASH_LABEL: "h1"}}],
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_up_to_date_in_two_questions(engine: _Engine) -> None:
    found = uptodate.check([CELL], engine.server_address)  # type: ignore[arg-type]
    assert found == [uptodate.Found(tag="b/tf:1-cpu", image_id="sha256:img", size=42)]
    # The base's id, then the cell's own image: the listing walks every image the engine holds, 20 times slower.
    assert engine.asked == ["/images/debian%3Abookworm-slim/json", "/images/b%2Ftf%3A1-cpu/json"]


def test_many_cells_are_listed_in_one_question(engine: _Engine) -> None:
    cells = [CELL._replace(tag=f"b/tf:{i}", content_hash=f"h{i}") for i in range(uptodate.INSPECT_MAX + 1)]
    engine.answers["/images/json"] = [{"Id": f"sha256:img{i}", "RepoTags": [f"b/tf:{i}"], "Size": i,
                                       "Labels": {uptodate.HASH_LABEL: f"h{i}"}} for i in range(len(cells))]
    found = uptodate.check(cells, engine.server_address)  # type: ignore[arg-type]
    assert found == [uptodate.Found(tag=f"b/tf:{i}", image_id=f"sha256:img{i}", size=i) for i in range(len(cells))]
    assert len(engine.asked) == 2 and engine.asked[1].startswith("/images/json?filters=")


@pytest.mark.parametrize("many", [False, True], ids=["one by one", "listed"])
@pytest.mark.parametrize("change", ["base moved", "base gone", "hash gone", "tag gone"])
def test_anything_changed_falls_through_to_the_full_path(engine: _Engine, change: str, many: bool) -> None:
    cells = [CELL] + ([CELL._replace(tag=f"b/tf:{i}", content_hash=f"h{i}") for i in range(uptodate.INSPECT_MAX)]
                      if many else [])
    engine.answers["/images/json"] += [{"Id": f"sha256:img{i}", "RepoTags": [f"b/tf:{i}"], "Size": i,
                                        "Labels": {uptodate.HASH_LABEL: f"h{i}"}} for i in range(len(cells) - 1)]
    listed, inspected = engine.answers["/images/json"][0], engine.answers["/images/b%2Ftf%3A1-cpu/json"]
    assert uptodate.check(cells, engine.server_address) is not None  # type: ignore[arg-type]
    if change == "base moved":
        engine.answers["/images/debian%3Abookworm-slim/json"] = {"Id": "sha256:other"}
    elif change == "base gone":
        del engine.answers["/images/debian%3Abookworm-slim/json"]
    elif change == "hash gone":
        listed["Labels"] = inspected["Config"]["Labels"] = {uptodate.HASH_LABEL: "h2"}
    else:
        listed["RepoTags"] = ["b/tf:other"]
        del engine.answers["/images/b%2Ftf%3A1-cpu/json"]
    assert uptodate.check(cells, engine.server_address) is None  # type: ignore[arg-type]


def test_no_engine_falls_through(tmp_path: Path) -> None:
    assert uptodate.check([CELL], str(tmp_path / "nothing.sock")) is None


@pytest.mark.parametrize("answer", [[], {"Id": "sha256:img", "Config": ["not", "a", "mapping"]}],
                         ids=["a list", "a config of another shape"])
def test_an_inspect_answer_of_another_shape_falls_through(engine: _Engine, answer: Any) -> None:
    engine.answers["/images/b%2Ftf%3A1-cpu/json"] = answer
    assert uptodate.check([CELL], engine.server_address) is None  # type: ignore[arg-type]
