"""Build-time sources: where they come from, what the builder stage gets, and the caching proxy."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.errors import SourceError
from builder.sources import PYPI, PackageProxy, Sources


def test_flags_win_over_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    env = {"PIP_CERT": "/nonexistent", "PIP_INDEX_URL": "https://mirror.example/simple/",
           "PIP_EXTRA_INDEX_URL": "https://a.example/simple https://b.example/simple"}
    src = Sources.from_env(ca_bundle=str(ca), index_url="https://flag.example/simple", environ=env)
    assert src.ca_bundle == ca and src.index_url == "https://flag.example/simple"
    assert src.extra_index_urls == ("https://a.example/simple", "https://b.example/simple")


def test_environment_variables_in_order(tmp_path):
    ca = tmp_path / "bundle.crt"
    ca.write_text("x")
    src = Sources.from_env(environ={"REQUESTS_CA_BUNDLE": str(ca), "SSL_CERT_FILE": "/nope"})
    assert src.ca_bundle == ca and src.index_url == PYPI
    assert Sources.from_env(environ={}).ca_bundle is None


def test_missing_ca_bundle_is_a_clear_error():
    with pytest.raises(SourceError, match=r"CA bundle /nope/ca\.pem does not exist"):
        Sources.from_env(environ={"PIP_CERT": "/nope/ca.pem"})


def test_proxy_mode_keeps_the_ca_bundle_on_the_host(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("SECRET")
    src = Sources.from_env(ca_bundle=str(ca), environ={})
    files = src.context_files("https://download.pytorch.org/whl/cpu", "http://127.0.0.1:9")
    conf = files["sources/pip.conf"].decode()
    assert "index-url = http://127.0.0.1:9/0/simple" in conf
    assert "extra-index-url = http://127.0.0.1:9/1/simple" in conf
    assert "sources/ca.pem" not in files and "cert" not in conf


def test_direct_mode_gives_the_builder_stage_the_ca_bundle(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("SECRET")
    src = Sources.from_env(ca_bundle=str(ca), proxy=False, environ={})
    files = src.context_files(None, None)
    assert files["sources/ca.pem"] == b"SECRET"
    conf = files["sources/pip.conf"].decode()
    assert "cert = /opt/builder-sources/ca.pem" in conf and f"index-url = {PYPI}" in conf


def test_local_find_links_travel_only_in_direct_mode(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    (house / "demo-1.0-py3-none-any.whl").write_bytes(b"wheel")
    src = Sources.from_env(find_links=[str(house)], environ={})
    assert "find-links = http://127.0.0.1:9/links/0/" in src.context_files(None, "http://127.0.0.1:9")[
        "sources/pip.conf"].decode()
    direct = Sources.from_env(find_links=[str(house)], proxy=False, environ={}).context_files(None, None)
    assert direct["sources/wheelhouse/demo-1.0-py3-none-any.whl"] == b"wheel"


@pytest.fixture
def upstream(tmp_path):
    """A PEP 503 simple index served from a folder, standing in for PyPI."""
    root = tmp_path / "index"
    (root / "simple" / "demo").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / "demo-1.0-py3-none-any.whl").write_bytes(b"w" * 5000)
    (root / "simple" / "demo" / "index.html").write_text(
        '<html><body><a href="../../files/demo-1.0-py3-none-any.whl#sha256=abc" '
        'data-requires-python="&gt;=3.8">demo-1.0-py3-none-any.whl</a></body></html>')
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def test_proxy_rewrites_pages_and_counts_only_upstream_bytes(upstream, tmp_path):
    import ssl

    cache = tmp_path / "cache"
    with PackageProxy([upstream], cache, ssl.create_default_context()) as first:
        page = _get(f"{first.url}/0/simple/demo/").decode()
        href = page.split('href="')[1].split('"')[0]
        assert href.startswith("/files/") and href.endswith("/demo-1.0-py3-none-any.whl#sha256=abc")
        assert 'data-requires-python="&gt;=3.8"' in page
        assert _get(first.url + href.split("#")[0]) == b"w" * 5000
        assert (first.upstream_bytes, first.cached_bytes) == (5000, 0)
    with PackageProxy([upstream], cache, ssl.create_default_context()) as second:
        assert _request(second.url + href.split("#")[0])[0] == 404  # another proxy's link: not followed
        again = _get(f"{second.url}/0/simple/demo/").decode().split('href="')[1].split("#")[0]
        assert _get(second.url + again) == b"w" * 5000
        assert (second.upstream_bytes, second.cached_bytes) == (0, 5000)  # the file is shared through the cache


@pytest.fixture
def counting(tmp_path):
    """A simple index of one project (demo) that notes every path asked of it: (its URL, its folder, the paths)."""
    root, asked = tmp_path / "index", []
    (root / "simple" / "demo").mkdir(parents=True)
    (root / "simple" / "demo" / "index.html").write_text('<a href="demo-1.0-py3-none-any.whl">demo</a>')

    class Counting(SimpleHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple", root, asked
    server.shutdown()


def test_an_index_page_is_fetched_once_per_proxy_and_a_failure_is_asked_again(counting, tmp_path):
    """A direct build resolves in each of its install steps: both see one snapshot of the index, fetched once;
    the next build's proxy fetches it fresh. A page that failed is not kept."""
    import ssl

    index, root, asked = counting
    with PackageProxy([index], tmp_path / "cache", ssl.create_default_context()) as proxy:
        first, merged = _get(f"{proxy.url}/0/simple/demo/"), _get(f"{proxy.url}/simple/demo/")
        assert _get(f"{proxy.url}/0/simple/demo/") == first and b"demo-1.0-py3-none-any.whl" in merged
        assert asked == ["/simple/demo/"]
        assert _request(f"{proxy.url}/0/simple/other/")[0] == 404
        (root / "simple" / "other").mkdir()
        (root / "simple" / "other" / "index.html").write_text('<a href="other-1.0.tar.gz">other</a>')
        assert b"other-1.0.tar.gz" in _get(f"{proxy.url}/0/simple/other/")
        assert asked == ["/simple/demo/", "/simple/other/", "/simple/other/"]
    with PackageProxy([index], tmp_path / "cache", ssl.create_default_context()) as fresh:
        _get(f"{fresh.url}/0/simple/demo/")
        assert asked[-1] == "/simple/demo/" and len(asked) == 4


def test_proxy_serves_local_find_links(tmp_path):
    import ssl

    house = tmp_path / "house"
    house.mkdir()
    (house / "demo-2.0-py3-none-any.whl").write_bytes(b"local")
    with PackageProxy([], tmp_path / "c", ssl.create_default_context(), [Path(house)]) as proxy:
        assert "demo-2.0-py3-none-any.whl" in _get(f"{proxy.url}/links/0/").decode()
        assert _get(f"{proxy.url}/links/0/demo-2.0-py3-none-any.whl") == b"local"
        assert proxy.upstream_bytes == 0


def test_an_empty_file_is_served_as_empty_and_no_error(tmp_path):
    """sendfile(2) refuses a count of 0: an empty file (or an empty range of one) is headers alone."""
    import ssl

    house = tmp_path / "house"
    house.mkdir()
    (house / "empty-1.0-py3-none-any.whl").write_bytes(b"")
    with PackageProxy([], tmp_path / "c", ssl.create_default_context(), [Path(house)]) as proxy:
        assert _get(f"{proxy.url}/links/0/empty-1.0-py3-none-any.whl") == b""
        assert _get(f"{proxy.url}/links/0/empty-1.0-py3-none-any.whl") == b""  # the connection's handler lives on
        assert proxy.errors == []


def test_an_upstream_that_breaks_off_mid_download_is_kept_as_an_error(tmp_path):
    import ssl
    from http.server import BaseHTTPRequestHandler

    class Short(BaseHTTPRequestHandler):
        def do_GET(self):  # promises 1,000,000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{server.server_address[1]}/files/big-1.0-py3-none-any.whl"

    try:
        with PackageProxy([], tmp_path / "cache", ssl.create_default_context()) as proxy:
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(f"{proxy.url}/files/{proxy.token(upstream)}/big-1.0-py3-none-any.whl")
            assert err.value.code == 502
            assert len(proxy.errors) == 1 and proxy.errors[0].startswith("big-1.0-py3-none-any.whl: ")
            assert proxy.token(upstream) not in proxy.errors[0]  # the token encodes the URL: never in a message
            assert (proxy.upstream_bytes, proxy.fetched) == (10, {})  # what came down, though none of it is kept
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half file cached
    finally:
        server.shutdown()


def _request(url: str, method: str = "GET", range_: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={"Range": range_} if range_ else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


def test_proxy_answers_head_and_byte_ranges_as_uv_asks_them(upstream, tmp_path):
    """uv asks HEAD, then reads a wheel's metadata through byte ranges, when the index publishes none
    (torch 2.4.1 on PyPI): a proxy without either failed uv's install (501 on HEAD)."""
    import ssl

    cache = tmp_path / "cache"
    with PackageProxy([upstream], cache, ssl.create_default_context()) as proxy:
        page = _get(f"{proxy.url}/0/simple/demo/").decode()
        url = proxy.url + page.split('href="')[1].split("#")[0]
        status, headers, body = _request(url, "HEAD")
        assert (status, headers["Content-Length"], headers["Accept-Ranges"], body) == (200, "5000", "bytes", b"")
        assert proxy.upstream_bytes == 5000  # fetched once, on the HEAD, so that ranges come from the cache
        status, headers, body = _request(url, range_="bytes=-100")
        assert (status, headers["Content-Range"], body) == (206, "bytes 4900-4999/5000", b"w" * 100)
        status, headers, body = _request(url, range_="bytes=10-19")
        assert (status, headers["Content-Range"], len(body)) == (206, "bytes 10-19/5000", 10)
        assert _request(url, range_="bytes=4990-")[2] == b"w" * 10
        status, headers, _ = _request(url, range_="bytes=6000-")
        assert (status, headers["Content-Range"]) == (416, "bytes */5000")
        assert _request(url, range_="items=1-2")[0] == 200  # not a byte range: the whole file
        assert _get(url) == b"w" * 5000
        # All of it came down once in this run: none of it counts as "from cache".
        assert (proxy.upstream_bytes, proxy.cached_bytes) == (5000, 0)
    with PackageProxy([upstream], cache, ssl.create_default_context()) as again:
        page = _get(f"{again.url}/0/simple/demo/").decode()
        assert _request(again.url + page.split('href="')[1].split("#")[0], range_="bytes=-100")[0] == 206
        assert (again.upstream_bytes, again.cached_bytes) == (0, 100)  # what was sent, not the file's size


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A real (tiny) wheel, so that uv reads its metadata as it reads torch's."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_uv_installs_through_the_proxy_with_the_generated_config(tmp_path):
    """The matrix's installer end to end on the host: the uv.toml that context_files writes, uv from the dev
    extra, the proxy in front of a PEP 503 index whose links carry no metadata (uv falls back to HEAD and
    byte ranges), and the best version across two indexes, as pip picks it (unsafe-best-match)."""
    import shutil
    import ssl
    import subprocess
    import sys

    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed beside this Python (pip install -e '.[dev]')")
    roots = []
    for i, version in enumerate(("1.0", "2.0")):  # the second index has the newer release
        root = tmp_path / f"index{i}"
        (root / "simple" / "demo").mkdir(parents=True)
        wheel = _wheel(root, "demo", version)
        (root / "simple" / "demo" / "index.html").write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>')
        roots.append(root)
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(r)))
               for r in roots]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    upstreams = [f"http://127.0.0.1:{s.server_address[1]}/simple" for s in servers]
    try:
        src = Sources.from_env(index_url=upstreams[0], extra_index_urls=[upstreams[1]], environ={},
                               cache_dir=str(tmp_path / "cache"))
        with PackageProxy(src.indexes_for(None), src.cache_dir, ssl.create_default_context()) as proxy:
            config = tmp_path / "uv.toml"
            config.write_bytes(src.context_files(None, proxy.url)["sources/uv.toml"])
            venv = tmp_path / "venv"
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "UV_CONFIG_FILE": str(config)}
            done = subprocess.run([uv, "pip", "install", "--python", str(venv / "bin" / "python"), "--no-cache",
                                   "demo"], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "demo==2.0" in done.stderr
            assert proxy.upstream_bytes > 0 and not proxy.errors
    finally:
        for server in servers:
            server.shutdown()


def test_uv_toml_says_what_pip_conf_says(tmp_path):
    import tomllib

    house = tmp_path / "house"
    house.mkdir()
    src = Sources.from_env(extra_index_urls=["https://extra.example/simple"], find_links=[str(house),
                           "https://links.example/"], environ={})
    proxied = tomllib.loads(src.context_files("https://download.pytorch.org/whl/cpu", "http://127.0.0.1:9")[
        "sources/uv.toml"].decode())["pip"]
    assert proxied == {"index-url": "http://127.0.0.1:9/0/simple",
                       "extra-index-url": ["http://127.0.0.1:9/1/simple", "http://127.0.0.1:9/2/simple"],
                       "find-links": ["https://links.example/", "http://127.0.0.1:9/links/0/"],
                       "index-strategy": "unsafe-best-match"}
    direct = tomllib.loads(Sources.from_env(find_links=[str(house)], proxy=False, environ={}).context_files(
        None, None)["sources/uv.toml"].decode())["pip"]
    assert direct["index-url"] == PYPI and direct["find-links"] == ["/opt/builder-sources/wheelhouse"]


def _serve(handler: type) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_the_proxy_fetches_only_what_its_own_pages_linked(tmp_path):
    """A /files/ token is the URL signed by this proxy: a build step cannot make the proxy read a host file
    (file://) or any other address by writing its own token, and a page's file:// link is refused."""
    import base64
    import ssl

    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    root = tmp_path / "index"
    (root / "simple" / "demo").mkdir(parents=True)
    (root / "simple" / "demo" / "index.html").write_text(f'<a href="file://{secret}">demo-1.0-py3-none-any.whl</a>')
    server, base = _serve(partial(SimpleHTTPRequestHandler, directory=str(root)))
    try:
        with PackageProxy([f"{base}/simple"], tmp_path / "cache", ssl.create_default_context()) as proxy:
            unsigned = base64.urlsafe_b64encode(f"file://{secret}".encode()).decode().rstrip("=")
            for token in (unsigned, unsigned + ".0123", "!!not-base64"):
                status, _, body = _request(f"{proxy.url}/files/{token}/x.whl")
                assert (status, body) == (404, b""), token
            page = _get(f"{proxy.url}/0/simple/demo/").decode()
            status, _, body = _request(proxy.url + page.split('href="')[1].split('"')[0])
            assert status == 502 and b"host secret" not in body
            assert proxy.errors and "not an http(s) URL" in proxy.errors[-1]
            for path in ("/simple/../etc/", "/0/simple/demo/extra/", "/simple/a%2F..%2Fb/", "/simple/../",
                         "/0/simple/./", "/simple/-demo/"):
                assert _request(proxy.url + path)[0] == 404, path
            # A signed link's name may add `.metadata` (PEP 658) and nothing else: not another host or path.
            signed = proxy.token(f"{base}/files/demo")
            for name in ("demo.evil.example", "demo@evil.example", "demo/../../secret.txt", "demo.metadataX"):
                assert _request(f"{proxy.url}/files/{signed}/{name}")[0] in (404, 502), name
            assert all(not line.endswith(("evil.example", "secret.txt", "metadataX")) for line in proxy.errors)
    finally:
        server.shutdown()


def test_index_credentials_go_to_their_host_only_and_never_into_a_link(tmp_path):
    """Indexes given as http://user:password@host/...: urllib alone does not send them (it takes the
    user:password@ for part of the host name). The proxy sends each index's own as Basic auth, to its files too
    (two indexes on one host, two tokens), through a redirect on that host, never to another host, and its
    pages' links (which the build sees) carry none."""
    import base64
    import ssl
    from http.server import BaseHTTPRequestHandler

    seen: list[tuple[str, str | None]] = []
    creds = {"a": "Basic " + base64.b64encode(b"me:s3cr%t").decode(), "b": "Basic " + base64.b64encode(b"u2:p2").decode()}

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((f"elsewhere{self.path}", self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"moved")

        def log_message(self, *args):
            pass

    other, other_base = _serve(Elsewhere)

    class Private(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            index = self.path.split("/")[1]
            if self.headers.get("Authorization") != creds.get(index):
                self.send_error(401)
                return
            if self.path.endswith("/go"):  # a redirect within the host, then one to another host
                self.send_response(302)
                self.send_header("Location", f"/{index}/f/{index}-1.0-py3-none-any.whl" if index == "a"
                                 else f"{other_base}/x-1.0-py3-none-any.whl")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if "/simple/" in self.path and self.path != f"/{index}/simple/{index}/":  # each index has one project
                self.send_error(404)
                return
            body = (f'<a href="/{index}/f/{index}-1.0-py3-none-any.whl">{index}-1.0-py3-none-any.whl</a>'
                    f'<a href="/{index}/go">{index}-2.0-py3-none-any.whl</a>' if "/simple/" in self.path
                    else f"wheel {index}").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server, base = _serve(Private)
    index_a = base.replace("http://", "http://me:s3cr%25t@") + "/a/simple"
    index_b = base.replace("http://", "http://u2:p2@") + "/b/simple"
    try:
        with PackageProxy([index_a, index_b], tmp_path / "cache", ssl.create_default_context()) as proxy:
            for index in ("a", "b"):
                page = _get(f"{proxy.url}/simple/{index}/").decode()
                assert "s3cr" not in page and "me:" not in page and "p2" not in page
                links = [part.split('"')[0] for part in page.split('href="')[1:]]
                for link in links:
                    token = link.split("/")[2]
                    assert "s3cr" not in base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()
                assert _get(proxy.url + links[0]) == f"wheel {index}".encode()
                assert _get(proxy.url + links[1]) == (b"wheel a" if index == "a" else b"moved")
        sent = dict(seen)
        assert sent["/a/simple/a/"] == sent["/a/f/a-1.0-py3-none-any.whl"] == sent["/a/go"] == creds["a"]
        assert sent["/b/simple/b/"] == sent["/b/f/b-1.0-py3-none-any.whl"] == sent["/b/go"] == creds["b"]
        assert sent["elsewhere/x-1.0-py3-none-any.whl"] is None  # the redirect to another host went without
        assert [a for p, a in seen if p == "/a/f/a-1.0-py3-none-any.whl"] == [creds["a"], creds["a"]]
    finally:
        server.shutdown()
        other.shutdown()


def test_a_find_links_page_that_fails_offers_nothing_and_is_named(tmp_path):
    """pip skips a find-links page it cannot read, with a warning: the merged page still answers from the
    indexes, and the proxy keeps the error (by the page's number, not its URL) for the build's message."""
    import ssl
    from http.server import BaseHTTPRequestHandler

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/links"):
                self.send_error(401)
                return
            body = b'<a href="/f/demo-0.9-py3-none-any.whl">demo-0.9-py3-none-any.whl</a>'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server, base = _serve(Pages)
    try:
        with PackageProxy([f"{base}/simple"], tmp_path / "cache", ssl.create_default_context(),
                          remote_links=(f"{base}/links/secret-token/",)) as proxy:
            assert "demo-0.9" in _get(f"{proxy.url}/simple/demo/").decode()
            assert proxy.errors == ["find-links page 1: HTTPError: HTTP Error 401: Unauthorized"]
    finally:
        server.shutdown()


def test_a_403_from_an_index_with_credentials_is_an_error_not_a_fall_back(tmp_path):
    """A private index that refuses its credentials must not drop out of the merged page silently (PyPI's
    project of the same name would be served instead); a 403 from an index without any is skipped."""
    import ssl
    from http.server import BaseHTTPRequestHandler

    class Refuses(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/private/") or self.path.startswith("/public-403/"):
                self.send_error(403)
                return
            body = b'<a href="/f/demo-0.9-py3-none-any.whl">demo-0.9-py3-none-any.whl</a>'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server, base = _serve(Refuses)
    private = base.replace("http://", "http://u:expired@") + "/private"
    try:
        with PackageProxy([f"{base}/public-403", f"{base}/simple"], tmp_path / "c1",
                          ssl.create_default_context()) as proxy:
            assert _request(f"{proxy.url}/simple/demo/")[0] == 200
        with PackageProxy([private, f"{base}/simple"], tmp_path / "c2", ssl.create_default_context()) as proxy:
            assert _request(f"{proxy.url}/simple/demo/")[0] == 403
    finally:
        server.shutdown()


def test_merged_page_skips_an_index_that_refuses_and_reads_find_links_by_file_name(tmp_path):
    """PyTorch's indexes answer 403 for a project they do not host, which must not fail the merged page; a
    find-links page whose link text is a path with `+` as %2B (torch_stable.html) still offers its file."""
    import ssl
    from http.server import BaseHTTPRequestHandler

    wheel = "demo-1.0%2Bcu121-py3-none-any.whl"
    counts = {"links": 0}

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/refuses/"):
                self.send_error(403)
                return
            if self.path.startswith("/links"):
                counts["links"] += 1
                body = (f'<a href="cu121/{wheel}">cu121/{wheel}</a>\n'
                        '<a href="cu121/other-2.0-py3-none-any.whl">cu121/other-2.0-py3-none-any.whl</a>').encode()
            else:
                body = b'<a href="/f/demo-0.9-py3-none-any.whl">demo-0.9-py3-none-any.whl</a>'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server, base = _serve(Pages)
    try:
        with PackageProxy([f"{base}/refuses", f"{base}/simple"], tmp_path / "cache", ssl.create_default_context(),
                          remote_links=(f"{base}/links.html",)) as proxy:
            page = _get(f"{proxy.url}/simple/demo/").decode()
            assert "demo-0.9-py3-none-any.whl" in page and wheel in page and "other-2.0" not in page
            _get(f"{proxy.url}/simple/demo/")
            assert counts["links"] == 1  # the find-links page is read once per proxy
            assert _request(f"{proxy.url}/0/simple/demo/")[0] == 403  # one index's own page: its own answer
    finally:
        server.shutdown()


def test_proxy_edges_pip_and_uv_reach(upstream, tmp_path):
    """A reversed range is no range (the whole file); the packages host with its default port :80 is the
    same host; a local wheel asked for with `+` as %2B is found."""
    import ssl

    house = tmp_path / "house"
    house.mkdir()
    (house / "demo-2.0+local-py3-none-any.whl").write_bytes(b"local")
    with PackageProxy([upstream], tmp_path / "cache", ssl.create_default_context(), [house]) as proxy:
        page = _get(f"{proxy.url}/0/simple/demo/").decode()
        url = proxy.url + page.split('href="')[1].split("#")[0]
        status, _, body = _request(url, range_="bytes=10-5")
        assert (status, len(body)) == (200, 5000)
        assert _get(f"{proxy.url}/links/0/demo-2.0%2Blocal-py3-none-any.whl") == b"local"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
        with opener.open("http://packages.builder.invalid:80/simple/demo/", timeout=10) as resp:
            assert b"demo-1.0-py3-none-any.whl" in resp.read()


def test_a_client_that_hangs_up_is_no_upstream_failure(tmp_path):
    """uv cancels requests it no longer needs: the proxy's write then fails, which is not the upstream's
    failure and must not reach the build's error message."""
    import socket
    import ssl
    import time

    house = tmp_path / "house"
    house.mkdir()
    (house / "big-1.0-py3-none-any.whl").write_bytes(b"b" * (64 << 20))
    with PackageProxy([], tmp_path / "cache", ssl.create_default_context(), [house]) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /links/0/big-1.0-py3-none-any.whl HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.0 200")
        time.sleep(1)
        assert proxy.errors == []


def test_the_proxy_queues_a_resolvers_burst_of_connections(tmp_path):
    """uv connects once per project, all at once. Each connection must be queued by the kernel, not dropped
    and retried a second later (a backlog of socketserver's default 5 cost every resolution a second)."""
    import socket
    import ssl
    from http.server import BaseHTTPRequestHandler

    proxy = PackageProxy([], tmp_path, ssl.create_default_context())
    server = proxy._bind(BaseHTTPRequestHandler)  # listening but accepting nothing: only the backlog holds them
    socks: list[socket.socket] = []
    try:
        for _ in range(32):  # a dropped SYN is sent again after a second: a timeout here
            socks.append(socket.create_connection(server.server_address[:2], timeout=0.5))
    finally:
        for sock in socks:
            sock.close()
        server.server_close()
    assert len(socks) == 32


def _deflated_wheel(folder: Path) -> Path:
    """A wheel as indexes ship them: members deflated, one of them an executable script, with its RECORD."""
    import base64
    import hashlib
    import zipfile

    members = {"fast/__init__.py": b"X = 1\n" * 2000, "fast/sub/data.bin": bytes(range(256)) * 400,
               "fast-1.0.data/scripts/fast-tool": b"#!python\nprint('tool')\n",
               "fast-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fast\nVersion: 1.0\n",
               "fast-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
                     for n, d in members.items()) + "fast-1.0.dist-info/RECORD,,\n"
    path = folder / "fast-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in [*members.items(), ("fast-1.0.dist-info/RECORD", record.encode())]:
            info = zipfile.ZipInfo(name, (2024, 1, 2, 3, 4, 6))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100755 if "scripts" in name else 0o100644) << 16
            zf.writestr(info, data)
    return path


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: its bytes and mode, by relative path (uv's own .lock left out)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_wheel_is_stored_for_later_builds_and_installs_the_same_files(tmp_path):
    """A wheel served as the index has it is written again with its members stored, not deflated, for the next
    build's proxy, which offers that form under its own sha256: uv checks it, copies instead of inflating, and
    installs the same files, bytes and modes, RECORD and all. A stored form the cache lost after its page offered
    it is made again, byte for byte (the page's hash still holds)."""
    import hashlib
    import shutil
    import ssl
    import subprocess
    import sys
    import zipfile

    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed beside this Python (pip install -e '.[dev]')")
    root = tmp_path / "index"
    (root / "simple" / "fast").mkdir(parents=True)
    wheel = _deflated_wheel(root)
    (root / f"{wheel.name}.metadata").write_bytes(b"Metadata-Version: 2.1\nName: fast\nVersion: 1.0\n")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "fast" / "index.html").write_text(
        f'<a href="../../{wheel.name}#sha256={digest}" data-dist-info-metadata="true">{wheel.name}</a>')
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index, cache = f"http://127.0.0.1:{server.server_address[1]}/simple", tmp_path / "cache"

    venv, site = tmp_path / "venv", "lib/python{}.{}/site-packages".format(*sys.version_info[:2])

    def install(proxy: PackageProxy) -> dict[str, tuple[bytes, int]]:  # at one path: scripts name their Python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        done = subprocess.run([uv, "pip", "install", "--python", str(venv / "bin" / "python"), "--no-cache",
                               "--index-url", f"{proxy.url}/0/simple", "fast==1.0"],
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return {**_tree(venv / site), **_tree(venv / "bin")}

    try:
        with PackageProxy([index], cache, ssl.create_default_context()) as first:
            assert f'/{wheel.name}#sha256={digest}"' in _get(f"{first.url}/0/simple/fast/").decode()
            installed = install(first)
            assert first.upstream_bytes > 0 and not first.errors
        [stored] = cache.glob(f"*/*-{wheel.name}.stored")
        with zipfile.ZipFile(stored) as zf, zipfile.ZipFile(wheel) as original:
            assert {m.compress_type for m in zf.infolist()} == {zipfile.ZIP_STORED}
            assert [(m.filename, m.date_time, m.external_attr) for m in zf.infolist()] == \
                [(m.filename, m.date_time, m.external_attr) for m in original.infolist()]
        own = hashlib.sha256(stored.read_bytes()).hexdigest()
        with PackageProxy([index], cache, ssl.create_default_context()) as second:
            href = _get(f"{second.url}/0/simple/fast/").decode().split('href="')[1].split('"')[0]
            assert href.startswith("/stored/") and href.endswith(f"/{wheel.name}#sha256={own}")
            assert _get(second.url + href.split("#")[0] + ".metadata").startswith(b"Metadata-Version")
            stored.unlink()  # lost after the page offered it: made again, the same bytes
            assert install(second) == installed
            assert second.upstream_bytes == 0 and second.cached_bytes >= stored.stat().st_size
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == own
        assert installed["fast-tool"][1] & 0o111 and "fast/sub/data.bin" in installed
    finally:
        server.shutdown()


def _serve_index(root: Path, project: str, links: dict[str, str]) -> ThreadingHTTPServer:
    """A simple index of one project under `root`: its page links each file name to `root/<name>` with a fragment."""
    (root / "simple" / project).mkdir(parents=True, exist_ok=True)
    (root / "simple" / project / "index.html").write_text(
        "".join(f'<a href="../../{name}#{fragment}">{name}</a>\n' for name, fragment in links.items()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_wheel_is_stored_only_from_bytes_that_match_its_index(tmp_path, caplog):
    """The stored form is served under a hash of its own, so it is made only from a whole, readable wheel that
    matches the index's digest (sha256 or stronger); anything else is left as it was, to the installer's own check,
    with one line and no traceback, no temporary file and no open file left. A record made for another digest is
    not offered."""
    import hashlib
    import os
    import ssl
    import zipfile

    from builder.sources import store_wheel

    root = tmp_path / "index"
    root.mkdir()
    good = _deflated_wheel(root)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as zf:  # the same wheel with one member's deflated bytes spoiled, then renamed
        at = zf.getinfo("fast/sub/data.bin").header_offset + 30 + len("fast/sub/data.bin") + 40
    spoiled = root / "fast-2.0-py3-none-any.whl"
    spoiled.write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at:at + 64]) + data[at + 64:])
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (good, spoiled)}
    weak = root / "fast-3.0-py3-none-any.whl"
    weak.write_bytes(data)
    server = _serve_index(root, "fast", {good.name: "sha256=" + "0" * 64, spoiled.name: f"sha256={sha[spoiled.name]}",
                                         weak.name: f"md5={hashlib.md5(data).hexdigest()}"})
    index, cache = f"http://127.0.0.1:{server.server_address[1]}/simple", tmp_path / "cache"
    try:
        with PackageProxy([index], cache, ssl.create_default_context()) as proxy:
            page = _get(f"{proxy.url}/0/simple/fast/").decode()
            for href in page.split('href="')[1:]:
                assert _get(proxy.url + href.split("#")[0])  # each served as the index has it
        assert "fast-1.0-py3-none-any.whl not stored for later builds: it does not match its index's sha256" \
            in caplog.text
        assert "fast-2.0-py3-none-any.whl not stored for later builds: not a wheel it can read" in caplog.text
        assert "Traceback" not in caplog.text and "fast-3.0" not in caplog.text  # md5: never a stored form
        assert not list(cache.glob("*/*.stored*")) and not list(cache.glob("*/.part-*"))
        junk = tmp_path / "junk-1.0-py3-none-any.whl"  # matches its digest, and is no zip: no file left open
        junk.write_bytes(b"not a zip")
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            with pytest.raises(ValueError, match="not a wheel it can read"):
                store_wheel(junk, f"sha256={hashlib.sha256(b'not a zip').hexdigest()}")
        assert len(os.listdir("/proc/self/fd")) <= fds  # each leaked descriptor would add one
        [original] = cache.glob(f"*/*-{good.name}")
        with pytest.raises(ValueError, match="does not match"):
            store_wheel(original, "sha256=" + "1" * 64)
        store_wheel(original, f"sha256={hashlib.sha256(data).hexdigest()}")  # made for the right digest only
        with PackageProxy([index], cache, ssl.create_default_context()) as again:
            assert f'/{good.name}#sha256={"0" * 64}"' in _get(f"{again.url}/0/simple/fast/").decode()
    finally:
        server.shutdown()


def test_a_signed_link_serves_its_file_and_metadata_and_nothing_else(tmp_path):
    """A link's file is asked by its name as the installer spells it (uv sends `+`, pip `%2B`), stored form or
    not; a request under any other name is refused and writes nothing into the cache (it had downloaded the file
    again under that name, and `<name>.stored` would have planted a deflated file where the stored form goes)."""
    import hashlib
    import shutil
    import ssl

    root = tmp_path / "index"
    root.mkdir()
    wheel = _deflated_wheel(root)
    local = wheel.rename(root / "fast-1.0+cpu-py3-none-any.whl")
    server = _serve_index(root, "fast", {local.name: f"sha256={hashlib.sha256(local.read_bytes()).hexdigest()}"})
    index, cache = f"http://127.0.0.1:{server.server_address[1]}/simple", tmp_path / "cache"
    try:
        for route in ("files", "stored"):
            with PackageProxy([index], cache, ssl.create_default_context()) as proxy:
                href = _get(f"{proxy.url}/0/simple/fast/").decode().split('href="')[1].split("#")[0]
                assert href.startswith(f"/{route}/")
                folder = href.rsplit("/", 1)[0]
                for name in (local.name, local.name.replace("+", "%2B")):
                    # Asked as a range of the whole: served, and no stored form started under the listing below.
                    assert _request(f"{proxy.url}{folder}/{name}", range_="bytes=0-")[0] == 200, (route, name)
                files = sorted(p.name for p in cache.rglob("*"))
                for name in (f"{local.name}.stored", f"{local.name}.stored.json", "other-1.0-py3-none-any.whl",
                             f"{local.name}.x"):
                    assert _request(f"{proxy.url}{folder}/{name}")[0] == 404, (route, name)
                assert sorted(p.name for p in cache.rglob("*")) == files
                no_digest = proxy.token(f"{index}/x.whl")  # a link without the index's digest has no stored form
                assert _request(f"{proxy.url}/stored/{no_digest}/x.whl")[0] == 404
                _get(f"{proxy.url}{href}")  # whole: its stored form is made as this proxy closes, for the next
    finally:
        server.shutdown()
        shutil.rmtree(cache, ignore_errors=True)


def test_the_pages_of_the_last_lock_are_fetched_as_the_proxy_starts(counting, tmp_path):
    """A build's first resolution waited 1 to 3 s for its index pages, which the proxy fetches once anyway: given
    the projects of the cell's last lock, it fetches them as it starts (while apt runs), so the resolver's request
    is answered from the page memo. A project the index lacks costs one request and no error; a name that is no
    project is never asked."""
    import ssl
    import time

    index, _, asked = counting
    with PackageProxy([index], tmp_path / "cache", ssl.create_default_context(),
                      prefetch=("Demo", "gone", "../etc")) as proxy:
        deadline = time.monotonic() + 10
        while len(asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(asked) == ["/simple/demo/", "/simple/gone/"]
        assert b"demo-1.0-py3-none-any.whl" in _get(f"{proxy.url}/simple/demo/")
        assert asked.count("/simple/demo/") == 1 and not proxy.errors
