"""The package proxy rewrites an index page in one pass: a page with tens of thousands of links (grpcio's has
11,282) took 28 s with a str.replace per link, for every cell that installs it."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.sources import PackageProxy

LINKS = 20_000


@pytest.fixture
def upstream() -> Iterator[str]:
    anchors = "".join(f'<a href="../../packages/aa/bb/pkg-1.{i}-py3-none-any.whl#sha256={i:064x}">pkg-1.{i}</a>\n'
                      for i in range(LINKS))
    page = f"<html><body>\n{anchors}<a href=\"https://elsewhere.invalid/x.whl\">x</a></body></html>\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


def test_a_page_of_many_links_is_rewritten_whole_and_fast(upstream: str, tmp_path: Path) -> None:
    with PackageProxy([upstream], tmp_path, ssl.create_default_context()) as proxy:
        started = time.monotonic()
        body = urllib.request.urlopen(f"{proxy.url}/0/simple/pkg/", timeout=60).read().decode()
        took = time.monotonic() - started
    assert body.count('href="/files/') == LINKS + 1
    assert "../../packages/" not in body and 'href="https://' not in body
    assert f"/pkg-1.{LINKS - 1}-py3-none-any.whl#sha256={LINKS - 1:064x}\"" in body
    assert took < 10, f"{LINKS} links took {took:.1f} s"  # one pass: well under a second here; per link: minutes


def test_the_proxy_port_and_so_pip_conf_are_the_same_on_every_run(tmp_path: Path) -> None:
    """The proxy's URL is in the builder stage's pip.conf: a new port on every run made `COPY sources/` miss the
    layer cache, so a cell that changed only after the builder stage (a model, its repository) ran pip again."""
    from builder.sources import Sources, preferred_ports, serve

    assert preferred_ports("") == []
    ports = preferred_ports("debian12|3.11||torch==2.4.1\n")
    assert ports == preferred_ports("debian12|3.11||torch==2.4.1\n") and len(set(ports)) == len(ports)
    assert all(20000 <= p < 50000 for p in ports) and ports != preferred_ports("debian12|3.12||torch==2.4.1\n")

    sources = Sources.from_env(ca_bundle=None, index_url="https://pypi.invalid/simple")
    confs = []
    for _ in range(2):  # two runs, one after the other
        with serve(sources, None, key="cell") as (files, proxy):
            assert proxy is not None and proxy.url.endswith(f":{preferred_ports('cell')[0]}")
            confs.append(files["sources/pip.conf"])
    assert confs[0] == confs[1]

    with serve(sources, None, key="cell") as (_, first), serve(sources, None, key="cell") as (_, second):
        # the same cell twice at once: the second takes the next port, never fails
        assert first is not None and second is not None
        assert second.url.endswith(f":{preferred_ports('cell')[1]}")
