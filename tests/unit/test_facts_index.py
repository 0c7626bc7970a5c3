"""`facts` against a bad index: a real HTTP server on 127.0.0.1 serving hostile replies. Every one ends in a
one-line SourceError that says what the index served; credentials go out as basic auth and are never shown."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder import facts
from builder.cli import main
from builder.errors import SourceError
from builder.sources import Sources

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-tok3n"
Reply = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, body: bytes, ctype: str = facts.SIMPLE_JSON, code: int = 200) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def page(files: list[dict[str, object]]) -> bytes:
    return json.dumps({"meta": {"api-version": "1.1"}, "name": "torch", "files": files}).encode()


GOOD = [{"filename": "torch-2.4.1-cp311-cp311-manylinux1_x86_64.whl", "url": "../../files/torch.whl", "hashes": {}}]


class Server:
    def __init__(self) -> None:
        self.reply: Reply = lambda h: send(h, page(GOOD))
        self.seen: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Authorization")))
                server.reply(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def index(url: str) -> facts.Index:
    return facts.Index(Sources(index_url=url))


def huge(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", facts.SIMPLE_JSON)
    handler.end_headers()
    chunk = b" " * (1 << 20)
    try:
        for _ in range(facts.MAX_PAGE // len(chunk) + 4):
            handler.wfile.write(chunk)
    except OSError:
        pass


def cut_short(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", facts.SIMPLE_JSON)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    handler.wfile.write(b'{"files": [')


HOSTILE: dict[str, tuple[Reply, str]] = {
    "html": (lambda h: send(h, b"<!DOCTYPE html><html><body><a href='x.whl'>x</a>", "text/html"),
             "served text/html for the torch page, not PEP 691 JSON"),
    "no-content-type": (lambda h: send(h, page(GOOD), ""), "not PEP 691 JSON"),
    "invalid-json": (lambda h: send(h, b'{"files": [}'), "served invalid JSON for the torch page; it starts"),
    "deep-json": (lambda h: send(h, b"[" * 200_000 + b"]" * 200_000), "invalid JSON"),
    "a-list": (lambda h: send(h, b"[1, 2]"), "served JSON of the wrong shape"),
    "files-not-list": (lambda h: send(h, b'{"files": {"a": 1}}'), "served JSON of the wrong shape"),
    "file-not-object": (lambda h: send(h, b'{"files": ["torch.whl"]}'), "served JSON of the wrong shape"),
    "filename-not-string": (lambda h: send(h, page([{"filename": 3, "url": "x"}])), "wrong shape"),
    "no-files": (lambda h: send(h, page([])), "lists no files for torch"),
    "http-500": (lambda h: send(h, b"oops", "text/plain", 500), "answered HTTP 500 for the torch page"),
    "http-404": (lambda h: send(h, b"", "text/plain", 404), "answered HTTP 404 for the torch page"),
    "too-big": (huge, "sent more than 64 MiB for the torch page; refused"),
    "cut-short": (cut_short, "failed while sending the torch page"),
    "control-chars": (lambda h: send(h, b"\x1b[2J\x07<html>", "text/html\x1b"), "not PEP 691 JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_bad_index_reply_is_one_line_saying_what_was_served(server, case):
    reply, expected = HOSTILE[case]
    server.reply = reply
    with pytest.raises(SourceError) as info:
        index(server.url).files("torch")
    message = str(info.value)
    assert expected in message and "\n" not in message and "\x1b" not in message and len(message) < 400, message
    assert message.startswith(f"index {server.url} ") or message.startswith(f"cannot reach index {server.url}")


def test_good_page_resolves_relative_urls(server):
    files = index(server.url).files("torch")
    assert files[0]["url"] == server.url.removesuffix("/simple") + "/files/torch.whl"


def test_credentials_go_as_basic_auth_and_are_never_shown(server, capsys, monkeypatch):
    url = server.url.replace("http://", f"http://builder:{SECRET}@")
    server.reply = lambda h: send(h, b"<html>", "text/html")
    with pytest.raises(SourceError) as info:
        index(url).files("torch")
    assert SECRET not in str(info.value) and "***@127.0.0.1" in str(info.value)
    (path, auth) = server.seen[-1]
    assert path == "/simple/torch/" and auth == "Basic " + base64.b64encode(f"builder:{SECRET}".encode()).decode()
    # and through the command line, whatever fails
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert main(["--matrix", str(ROOT / "matrix.yaml"), "facts", "--framework", "torch", "--index-url", url]) == 5
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_credentials_are_not_sent_to_another_host(server):
    other = Server()
    try:
        target = other.url.replace("/simple", "/moved/torch/")

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", target)
            h.end_headers()

        server.reply = redirect
        other.reply = lambda h: send(h, page(GOOD))
        index(server.url.replace("http://", f"http://u:{SECRET}@")).files("torch")
        assert server.seen[-1][1] is not None
        assert other.seen and other.seen[-1][1] is None
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()


def test_metadata_size_is_capped_and_404_is_unavailable(server, monkeypatch):
    idx = index(server.url)
    entry = {"filename": "torch.whl", "url": server.url + "/torch.whl#sha256=ab"}
    server.reply = lambda h: send(h, b"", "text/plain", 404)
    assert idx.metadata(entry) is None
    assert server.seen[-1][0] == "/simple/torch.whl.metadata"
    monkeypatch.setattr(facts, "MAX_METADATA", 1000)
    server.reply = lambda h: send(h, b"Requires-Dist: x\n" * 1000, "text/plain")
    with pytest.raises(SourceError, match="sent more than"):
        idx.metadata(entry)


@pytest.mark.parametrize("url", ["ftp://example.com/simple", "not a url", "http://", "http://host:99999/simple",
                                 "https://exa mple.com/simple", "http://host/\x1b[2J", "file:///etc/passwd", ""])
def test_index_urls_that_cannot_be_used_are_refused(url):
    with pytest.raises(SourceError) as info:
        facts.Index(Sources(index_url=url))
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_unreachable_index_is_one_line():
    with pytest.raises(SourceError, match=r"cannot reach index http://127\.0\.0\.1:9/simple"):
        index("http://127.0.0.1:9/simple").files("torch")


def test_a_bad_ca_bundle_is_one_line(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate")
    with pytest.raises(SourceError, match="cannot be used"):
        facts.Index(Sources(index_url="https://pypi.org/simple", ca_bundle=bundle))
