"""An engine that is not this machine: where the package proxy listens, and apt's route through it."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from builder import build as build_mod
from builder.build import BuildOptions, build_cells
from builder.errors import SourceError
from builder.sources import LOOPBACK, PackageProxy, Sources, _route, apt_hosts, http_url, listen_address

from .fakes import FakeEngine
from .golden import cell


def no_resolve(host: str, port: int) -> str:
    raise AssertionError(f"a local engine must not be resolved ({host}:{port})")


def no_route(ip: str, port: int) -> str:
    raise AssertionError(f"a loopback engine needs no route ({ip}:{port})")


# ------------------------------------------------------------------------------------- the address
@pytest.mark.parametrize("address", ["unix:///var/run/docker.sock", "npipe:////./pipe/docker_engine",
                                     "fake://engine", "unix:///tmp/other.sock"])
def test_socket_engines_keep_loopback_without_any_lookup(address):
    assert listen_address(address, resolve=no_resolve, route=no_route) == LOOPBACK


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:2375", "tcp://localhost:2375", "ssh://me@localhost",
                                     "tcp://[::1]:2375", "127.0.0.1:2375", "tcp://127.0.0.2:2375"])
def test_loopback_engines_keep_loopback(address):
    assert listen_address(address, route=no_route) == LOOPBACK


def test_a_remote_engine_gets_the_one_local_address_its_route_leaves_from():
    asked: list[tuple[str, int]] = []

    def route(ip: str, port: int) -> str:
        asked.append((ip, port))
        return "10.213.5.1"

    resolve = {"engine.example": "10.213.5.2"}
    got = listen_address("tcp://engine.example:2376", resolve=lambda h, p: resolve[h], route=route)
    assert got == "10.213.5.1" and asked == [("10.213.5.2", 2376)]
    # ssh:// without a port is asked about port 22; a bare host:port is tcp
    assert listen_address("ssh://me@engine.example", resolve=lambda h, p: resolve[h], route=route) == "10.213.5.1"
    assert asked[-1] == ("10.213.5.2", 22)
    assert listen_address("engine.example:2375", resolve=lambda h, p: resolve[h], route=route) == "10.213.5.1"


@pytest.mark.parametrize("unspecified", ["0.0.0.0", "::"])
def test_never_every_address(unspecified):
    with pytest.raises(SourceError, match=r"no local address routes to the engine at tcp://10\.9\.9\.9:2375"):
        listen_address("tcp://10.9.9.9:2375", resolve=lambda h, p: h, route=lambda ip, p: unspecified)


def test_an_engine_host_that_does_not_resolve_is_one_clear_line():
    def resolve(host: str, port: int) -> str:
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(SourceError) as err:
        listen_address("tcp://no-such-engine.invalid:2375", resolve=resolve, route=no_route)
    assert "tcp://no-such-engine.invalid:2375" in str(err.value) and "\n" not in str(err.value)
    assert "--no-proxy" in str(err.value)


def test_the_kernel_route_to_loopback_leaves_from_loopback():
    assert _route("127.0.0.1", 9) == "127.0.0.1"


def test_urls_bracket_ipv6():
    assert http_url("10.213.5.1", 8080) == "http://10.213.5.1:8080"
    assert http_url("fd00::1", 8080) == "http://[fd00::1]:8080"


# ------------------------------------------------------------------------------------- apt's mirrors
def test_apt_hosts_from_both_source_formats():
    one_line = ("deb http://deb.debian.org/debian bookworm main\n"
                "# deb http://commented.example/debian bookworm main\n"
                "deb [arch=amd64] http://Mirror.Example:80/ubuntu jammy main\n"
                "deb https://tls-only.example/debian bookworm main\n")
    deb822 = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\n"
              "Types: deb\nURIs: http://security.example:8080/debian-security\n")
    assert apt_hosts([one_line, deb822, ""]) == {"deb.debian.org", "mirror.example", "security.example:8080"}


@pytest.fixture
def mirror(tmp_path):
    """A Debian-style mirror (dists/ and pool/) served over plain http on loopback."""
    root = tmp_path / "mirror"
    (root / "debian/dists/bookworm").mkdir(parents=True)
    (root / "debian/dists/bookworm/InRelease").write_bytes(b"Suite: bookworm\n")
    (root / "debian/dists/bookworm/main/by-hash/SHA256").mkdir(parents=True)
    (root / "debian/dists/bookworm/main/by-hash/SHA256/c0ffee").write_bytes(b"Package: hello\n" * 100)
    (root / "debian/pool/main/h").mkdir(parents=True)
    (root / "debian/pool/main/h/hello_1.0_amd64.deb").write_bytes(b"!<arch>\n" + b"x" * 5000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def get_through(proxy: PackageProxy, url: str) -> tuple[int, bytes]:
    """A GET as apt sends it to an http proxy: the absolute URL in the request line."""
    parsed = urllib.parse.urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_apt_reaches_only_the_bases_mirrors_and_each_deb_is_fetched_once(mirror, tmp_path):
    """.debs and the indexes apt asks by hash are named by their content: fetched once. The Release file that
    names the hashes is fetched fresh by every build."""
    netloc, root = mirror
    deb = f"http://{netloc}/debian/pool/main/h/hello_1.0_amd64.deb"
    release = f"http://{netloc}/debian/dists/bookworm/InRelease"
    index = f"http://{netloc}/debian/dists/bookworm/main/by-hash/SHA256/c0ffee"
    cache = tmp_path / "cache"
    with PackageProxy([], cache, ssl.create_default_context(), apt=frozenset({netloc})) as first:
        assert first.build_args() == {"http_proxy": first.url, "no_proxy": LOOPBACK}
        assert get_through(first, deb) == (200, (root / "debian/pool/main/h/hello_1.0_amd64.deb").read_bytes())
        assert get_through(first, release) == (200, b"Suite: bookworm\n")
        assert get_through(first, index) == (200, b"Package: hello\n" * 100)
        assert first.upstream_bytes == 5008 + 16 + 1500
        status, _ = get_through(first, "http://169.254.169.254/latest/meta-data/")
        assert status == 403  # not a mirror of the base: the proxy is no open relay
    (root / "debian/dists/bookworm/InRelease").write_bytes(b"Suite: bookworm\nVersion: 12.9\n")
    with PackageProxy([], cache, ssl.create_default_context(), apt=frozenset({netloc})) as second:
        assert get_through(second, deb)[0] == 200
        assert get_through(second, index) == (200, b"Package: hello\n" * 100)
        assert get_through(second, release) == (200, b"Suite: bookworm\nVersion: 12.9\n")  # Release is fresh
        assert second.cached_bytes == 5008 + 1500 and second.upstream_bytes == 30


def test_without_apt_mirrors_the_proxy_forwards_nothing(mirror, tmp_path):
    netloc, _ = mirror
    with PackageProxy([], tmp_path / "c", ssl.create_default_context()) as proxy:
        assert proxy.build_args() == {}
        assert get_through(proxy, f"http://{netloc}/debian/dists/bookworm/InRelease")[0] == 403


# ------------------------------------------------------------------------------------- a build
def test_a_build_on_a_remote_engine_gets_the_routed_proxy_and_apt_through_it(tmp_path, monkeypatch):
    """127.0.0.2 stands for the veth address: a loopback address other than 127.0.0.1 that a test may bind."""
    asked: list[str] = []

    def routed(address: str) -> str:
        asked.append(address)
        return "127.0.0.2"

    monkeypatch.setattr(build_mod, "listen_address", routed)
    engine = FakeEngine(address="tcp://10.213.5.2:2375")
    c = cell("tensorflow-2.18.0-cpu-py3.11")
    engine.add_image(c.base.image)
    options = BuildOptions(state_dir=tmp_path / "state", sources=Sources(cache_dir=tmp_path / "c"), keep_cache=True)
    [res] = build_cells(engine, [c], options)
    assert res.status == "built" and asked == ["tcp://10.213.5.2:2375"]
    [done] = engine.builds
    pip_conf = done["files"]["sources/pip.conf"].decode()
    assert "index-url = http://127.0.0.2:" in pip_conf
    port = pip_conf.split("index-url = http://127.0.0.2:")[1].split("/")[0]
    assert f"trusted-host = 127.0.0.2:{port}\n" in pip_conf  # pip refuses plain http off loopback otherwise
    assert done["build_args"]["http_proxy"].startswith("http://127.0.0.2:")
    assert done["build_args"]["no_proxy"] == "127.0.0.2"


def test_a_local_builder_stage_build_sends_apt_nowhere_new(tmp_path):
    import dataclasses

    engine = FakeEngine(address="unix:///var/run/docker.sock")
    c = dataclasses.replace(cell("tensorflow-2.18.0-cpu-py3.11"), installer=None)  # pip: the builder-stage form
    engine.add_image(c.base.image)
    options = BuildOptions(state_dir=tmp_path / "state", sources=Sources(cache_dir=tmp_path / "c"), keep_cache=True)
    [res] = build_cells(engine, [c], options)
    assert res.status == "built"
    [done] = engine.builds
    pip_conf = done["files"]["sources/pip.conf"].decode()
    assert "index-url = http://127.0.0.1:" in pip_conf and "trusted-host" not in pip_conf
    assert done["build_args"] == {}


def test_a_local_direct_build_reaches_the_proxy_only_through_http_proxy(tmp_path):
    engine = FakeEngine(address="unix:///var/run/docker.sock")
    c = cell("tensorflow-2.18.0-cpu-py3.11")
    engine.add_image(c.base.image)
    options = BuildOptions(state_dir=tmp_path / "state", sources=Sources(cache_dir=tmp_path / "c"), keep_cache=True)
    [res] = build_cells(engine, [c], options)
    assert res.status == "built"
    [done] = engine.builds
    assert done["build_args"]["http_proxy"].startswith("http://127.0.0.1:")
    assert done["build_args"]["no_proxy"] == "127.0.0.1"
    dockerfile = done["files"]["Dockerfile"].decode()
    assert "http://packages.builder.invalid/simple" in dockerfile and "127.0.0.1" not in dockerfile
    assert "AS builder" not in dockerfile


def test_a_rebuild_has_its_proxy_fetch_the_pages_of_the_cells_last_lock(tmp_path, monkeypatch):
    """The first build of a cell has no lock to go by; a rebuild hands its proxy the last lock's projects and the
    installer's, whose pages it fetches while the first steps run."""
    import dataclasses

    seen: list[list[str]] = []
    real = build_mod.serve

    def spy(*args, **kwargs):
        seen.append(list(kwargs.get("prefetch", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "serve", spy)
    engine = FakeEngine(address="unix:///var/run/docker.sock")
    c = cell("tensorflow-2.18.0-cpu-py3.11")
    engine.add_image(c.base.image)
    options = BuildOptions(state_dir=tmp_path / "state", sources=Sources(cache_dir=tmp_path / "c"), keep_cache=True)
    assert build_cells(engine, [c], options)[0].status == "built"
    assert build_cells(engine, [c], dataclasses.replace(options, force=True))[0].status == "built"
    assert seen == [[], ["torch", c.installer.split("==")[0]]]  # the fake image's lock: torch==2.4.1


# ------------------------------------------------------------------------------------- ssh://
def test_an_ssh_engine_without_the_ssh_extra_says_what_to_install(monkeypatch):
    import importlib.util

    from builder.engine import Engine
    from builder.errors import EngineError

    if importlib.util.find_spec("paramiko") is not None:
        pytest.skip("paramiko is installed: the SDK would really try ssh")
    monkeypatch.setenv("DOCKER_HOST", "ssh://builder@build-host.invalid")
    with pytest.raises(EngineError) as err:
        Engine.connect(timeout=5)
    assert "pip install 'builder[ssh]'" in str(err.value) and "\n" not in str(err.value)
