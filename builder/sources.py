"""Build-time package sources: the CA bundle, package indexes, and the caching index that serves builds.

Every file pip or uv fetches for any cell goes through a small caching proxy. Builds use the engine host's
network, so the proxy listens on 127.0.0.1 for an engine on this machine, and on the one local address
that routes to the engine's host for a remote engine (never on every address). A wheel fetched once is
served from the host's cache to every later cell, and each proxy counts what it had to fetch upstream,
so the summary can show bytes per cell. The same proxy forwards apt's plain-http requests to the base's own
mirrors (each .deb cached once) for a remote engine, which may have no route out, and for a direct build.
The sources themselves (CA bundle, index URLs and their credentials) stay on the host: a direct build sees
only the proxy, a builder stage gets pip.conf and the CA bundle, and the final stage copies the venv alone.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html.parser
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

from builder.errors import SourceError
from builder.models import sha256_of
from builder.render import PACKAGES_HOST, SOURCES_DIR

log = logging.getLogger("builder")

PYPI = "https://pypi.org/simple"
CA_ENV = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
LOOPBACK = "127.0.0.1"
# Engine addresses that name a network peer; any other (unix://, npipe://, fd://) is a socket on this machine.
NETWORK_SCHEMES = ("tcp", "http", "https", "ssh")
# Where a base declares its apt mirrors (one-line and deb822 formats).
APT_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d/debian.sources",
               "/etc/apt/sources.list.d/ubuntu.sources")
_HREF = re.compile(r'href="([^"]*)"')
# The index digests a wheel is stored on (PEP 503 allows any of hashlib's; md5 and sha1 are too weak to vouch for a
# copy that is then served under a sha256 of its own).
_DIGESTS = frozenset({"sha256", "sha384", "sha512"})
_ANCHOR = re.compile(r"<a\s[^>]*>.*?</a>", re.IGNORECASE | re.DOTALL)
# A project's name as a simple index's URL names it (PEP 508): one path segment, and never `.` or `..`.
_PROJECT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_HTTP_HOST = re.compile(r"\bhttp://([A-Za-z0-9.-]+(?::[0-9]+)?)(?=[/\s]|$)", re.ASCII)


def _route(ip: str, port: int) -> str:
    """This machine's source address for packets to ip:port, as the routing table picks it.

    A UDP connect sends nothing: it only asks the kernel for the route.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((ip, port))
        return str(sock.getsockname()[0])


def _resolve(host: str, port: int) -> str:
    return str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0])


def listen_address(engine_address: str, *, resolve: Callable[[str, int], str] = _resolve,
                   route: Callable[[str, int], str] = _route) -> str:
    """The address the package proxy listens on so that builds on the engine's host reach it.

    unix://, npipe:// and loopback tcp:// engines share this machine's loopback: 127.0.0.1. For an engine
    elsewhere (tcp://HOST:PORT, ssh://USER@HOST) it is the local address the route to HOST leaves from:
    one address, never 0.0.0.0 or ::. Raises SourceError when HOST does not resolve or has no route.
    """
    parsed = urllib.parse.urlsplit(engine_address if "://" in engine_address else f"tcp://{engine_address}")
    if parsed.scheme not in NETWORK_SCHEMES or not parsed.hostname:
        return LOOPBACK
    host = parsed.hostname
    port = parsed.port or (22 if parsed.scheme == "ssh" else 2375)
    try:
        ip = resolve(host, port)
        if ipaddress.ip_address(ip.split("%")[0]).is_loopback:
            return LOOPBACK
        local = route(ip, port)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot tell which address of this machine the engine at {engine_address} reaches "
                          f"({exc}): check that {host} resolves and is routed, or build with --no-proxy") from None
    if ipaddress.ip_address(local.split("%")[0]).is_unspecified:
        raise SourceError(f"no local address routes to the engine at {engine_address}: build with --no-proxy")
    return local


def _netloc(netloc: str) -> str:
    """host[:port] as apt's proxy requests name it: lower case, without the default :80."""
    netloc = netloc.lower()
    return netloc[:-3] if netloc.endswith(":80") else netloc


def http_url(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def apt_hosts(texts: Iterable[str]) -> frozenset[str]:
    """The plain-http mirror hosts named by apt sources files (either format); comments are skipped."""
    hosts: set[str] = set()
    for text in texts:
        for line in text.splitlines():
            if not line.lstrip().startswith("#"):
                hosts.update(_netloc(m) for m in _HTTP_HOST.findall(line))
    return frozenset(hosts)


@dataclass(frozen=True, kw_only=True)
class Sources:
    """Where packages come from, as the host sees them. None of it is part of a cell's content hash."""

    ca_bundle: Path | None = None
    index_url: str = PYPI
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "builder" / "packages")
    proxy: bool = True  # False: pip in the builder stage talks to the indexes itself, with the CA bundle

    @classmethod
    def from_env(
        cls,
        *,
        ca_bundle: str | None = None,
        index_url: str | None = None,
        extra_index_urls: list[str] | None = None,
        find_links: list[str] | None = None,
        cache_dir: str | None = None,
        proxy: bool = True,
        environ: dict[str, str] | None = None,
    ) -> Sources:
        """Flags first, then the standard variables (PIP_CERT, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, ...)."""
        env = os.environ if environ is None else environ
        ca = ca_bundle or next((env[k] for k in CA_ENV if env.get(k)), None)
        ca_path = Path(ca) if ca else None
        if ca_path is not None and not ca_path.is_file():
            raise SourceError(f"CA bundle {ca_path} does not exist: pass --ca-bundle FILE or unset "
                              f"{'/'.join(CA_ENV)}")
        extras = extra_index_urls if extra_index_urls is not None else env.get("PIP_EXTRA_INDEX_URL", "").split()
        links = find_links if find_links is not None else env.get("PIP_FIND_LINKS", "").split()
        return cls(
            ca_bundle=ca_path,
            index_url=(index_url or env.get("PIP_INDEX_URL") or PYPI).rstrip("/"),
            extra_index_urls=tuple(u.rstrip("/") for u in extras if u),
            find_links=tuple(links),
            cache_dir=Path(cache_dir) if cache_dir else cls().cache_dir,
            proxy=proxy,
        )

    def local_links(self) -> list[Path]:
        return [Path(link) for link in self.find_links if "://" not in link and Path(link).is_dir()]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)

    def indexes_for(self, primary: str | None) -> list[str]:
        """The indexes a cell installs from: its own (e.g. the PyTorch index) first, then the defaults."""
        urls = [primary.rstrip("/")] if primary else []
        for url in (self.index_url, *self.extra_index_urls):
            if url not in urls:
                urls.append(url)
        return urls

    def context_files(self, primary_index: str | None, proxy_url: str | None) -> dict[str, bytes]:
        """sources/ as the builder stage receives it: a pip.conf, and the CA bundle when pip needs one."""
        files: dict[str, bytes] = {}
        lines = ["[global]", "disable-pip-version-check = true", "timeout = 120"]
        if proxy_url:
            urls = [f"{proxy_url}/{i}/simple" for i in range(len(self.indexes_for(primary_index)))]
            netloc = urllib.parse.urlsplit(proxy_url).netloc
            if urllib.parse.urlsplit(proxy_url).hostname != LOOPBACK:  # pip trusts plain http on loopback only
                lines.append(f"trusted-host = {netloc}")
        else:
            urls = self.indexes_for(primary_index)
            if self.ca_bundle:
                files[f"{SOURCES_DIR}/ca.pem"] = self.ca_bundle.read_bytes()
                lines.append("cert = /opt/builder-sources/ca.pem")
        lines.append(f"index-url = {urls[0]}")
        if urls[1:]:
            lines.append("extra-index-url = " + " ".join(urls[1:]))
        links = [link for link in self.find_links if "://" in link]
        local = self.local_links()
        if local and proxy_url:
            links += [f"{proxy_url}/links/{i}/" for i in range(len(local))]
        elif local:
            files.update(_wheelhouse_files(local))
            links.append("/opt/builder-sources/wheelhouse")
        if links:
            lines.append("find-links = " + " ".join(links))
        files[f"{SOURCES_DIR}/pip.conf"] = ("\n".join(lines) + "\n").encode()
        files[f"{SOURCES_DIR}/uv.toml"] = _uv_toml(urls, links)
        return files


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """The first and last byte of one `Range: bytes=...` (RFC 9110): the whole file when there is none or it
    is not one plain byte range; first > last when it lies past the end (416)."""
    match = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)", (header or "").strip())
    if not match or match[1] == match[2] == "":
        return 0, size - 1
    if match[1] == "":  # the last N bytes
        return max(0, size - int(match[2])), size - 1
    first = int(match[1])
    if match[2] and int(match[2]) < first:  # not a valid range (RFC 9110 14.1.1): ignored, the whole file
        return 0, size - 1
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    return (first, last) if first < size else (size, size - 1)


def _uv_toml(urls: list[str], links: list[str]) -> bytes:
    """The same sources for uv, which reads no pip.conf. unsafe-best-match: pip's resolution, which takes the
    best version from every index, not the first index that has the project (uv's default). The CA bundle
    reaches uv as SSL_CERT_FILE, set by the template's RUN when sources/ holds one."""
    def toml(values: list[str]) -> str:  # a TOML array of basic strings: JSON's escapes are TOML's
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"
    lines = ["[pip]", f"index-url = {json.dumps(urls[0])}", f"extra-index-url = {toml(urls[1:])}",
             f"find-links = {toml(links)}", 'index-strategy = "unsafe-best-match"']
    return ("\n".join(lines) + "\n").encode()


def _wheelhouse_files(folders: list[Path]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for folder in folders:
        for wheel in sorted(folder.glob("*.whl")):
            files[f"{SOURCES_DIR}/wheelhouse/{wheel.name}"] = wheel.read_bytes()
    return files


class _Links(html.parser.HTMLParser):
    """Collects the href of every anchor of a PEP 503 simple page, with its position in the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _file_name(anchor: str) -> str:
    """The file an anchor links to, by its href's last path segment (a page's text may be a path, or `+` as
    %2B, as PyTorch's torch_stable.html has it)."""
    href = _HREF.search(anchor)
    path = urllib.parse.urlsplit(html.unescape(href[1])).path if href else ""
    return urllib.parse.unquote(path.rsplit("/", 1)[-1])


def _project_of(filename: str) -> str | None:
    """The normalized project a wheel or sdist file name belongs to; None for anything else."""
    try:
        if filename.endswith(".whl"):
            return str(parse_wheel_filename(filename)[0])
        if filename.endswith((".tar.gz", ".zip")):
            return str(parse_sdist_filename(filename)[0])
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return None


def _split_auth(url: str) -> tuple[str, str | None]:
    """`url` without its user:password@, and the Basic Authorization header they make (None without)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {basic}"


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """An index's Authorization follows a redirect within its own scheme and host (a trailing slash, a
    normalized name), as pip's does, and never one to another host."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth:
            old, to = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
            if (old.scheme, old.netloc.lower()) == (to.scheme, to.netloc.lower()):
                new.add_unredirected_header("Authorization", auth)
        return new


class _ClientGone(Exception):
    """The client hung up while it was being answered (uv cancels prefetches): no upstream failure."""


PORTS = (20000, 50000)  # preferred proxy ports: above the well-known and registered ranges people configure
PORT_TRIES = 8


def preferred_ports(key: str) -> list[int]:
    """The ports a cell's proxy tries first, the same for the same key on every run; none for no key."""
    if not key:
        return []
    low, high = PORTS
    first = low + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (high - low)
    return [low + (first - low + i) % (high - low) for i in range(PORT_TRIES)]


STORED = ".stored"  # beside a cached wheel: the same wheel with every member stored, not deflated, and its record


def stored_paths(original: Path) -> tuple[Path, Path]:
    """Where the stored form of the cached wheel `original` and its record (upstream digest, own sha256) go."""
    return original.with_name(original.name + STORED), original.with_name(original.name + STORED + ".json")


def stored_digest(original: Path, upstream: str) -> str | None:
    """The sha256 of `original`'s stored form, where one was made from a file that matched `upstream`
    ("algo=hex", as an index's link fragment gives it); None where there is none to serve."""
    stored, record = stored_paths(original)
    try:
        made = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(made, dict) or str(made.get("upstream", "")).lower() != upstream.lower() or not stored.exists():
        return None
    own = str(made.get("sha256") or "")
    return own if re.fullmatch("[0-9a-f]{64}", own) else None


def store_wheel(original: Path, upstream: str, stop: threading.Event | None = None) -> str:
    """Write `original`, a wheel, again with every member stored (the ZIP method that copies bytes) beside it, and
    return the new file's sha256. The installer then copies a member instead of inflating it: inflating torch's
    wheel alone is 7.5 CPU seconds, on one thread, in every build. Members keep their names, order, bytes (so
    RECORD's hashes) and attributes: the installed tree is the same file for file. Made only from a file that
    matches `upstream` ("algo=hex", the index's own digest), read through one handle, since the stored form is
    served under its own hash. One at a time per wheel in this process; `stop` set: given up between chunks.
    """
    with _STORING_LOCK:
        lock = _STORING.setdefault(original, threading.Lock())
    with lock:
        if (done := stored_digest(original, upstream)) is not None:  # another proxy made it meanwhile
            return done
        return _store(original, upstream, stop or threading.Event())


def _store(original: Path, upstream: str, stop: threading.Event) -> str:
    algo, _, expected = upstream.partition("=")
    stored, record = stored_paths(original)
    fd, tmp = tempfile.mkstemp(dir=original.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as raw, original.open("rb") as fh:
            digest = hashlib.new(algo)
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
            if digest.hexdigest() != expected.lower():
                raise ValueError(f"it does not match its index's {algo}")
            fh.seek(0)
            try:
                with zipfile.ZipFile(fh) as wheel:
                    members = wheel.infolist()
                    if any(not m.flag_bits & 0x800 and not m.filename.isascii() for m in members):
                        # zipfile would read such a name as cp437 and write it as UTF-8: another path.
                        raise ValueError("a member's name is in a legacy encoding")
                    needed = sum(m.file_size for m in members) + (1 << 30)
                    if shutil.disk_usage(original.parent).free < needed:
                        raise ValueError(f"{needed / 1e9:.1f} GB free is needed beside the package cache")
                    with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as out:
                        for member in members:
                            copy = zipfile.ZipInfo(member.filename, member.date_time)
                            copy.external_attr, copy.create_system = member.external_attr, member.create_system
                            copy.file_size = member.file_size  # zipfile writes ZIP64 headers where needed
                            with wheel.open(member) as src, out.open(copy, "w") as dst:
                                while chunk := src.read(1 << 20):
                                    if stop.is_set():
                                        raise ValueError("the run ended first")
                                    dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
                # a member's CRC or data, a truncated archive, an encrypted member, a method zipfile lacks
                raise ValueError(f"not a wheel it can read: {exc}") from exc
        own = sha256_of(Path(tmp))
        os.replace(tmp, stored)
        # The record last: a page offers the stored form only once both are whole.
        fd, tmp = tempfile.mkstemp(dir=original.parent, prefix=".part-")
        with os.fdopen(fd, "w") as fh_text:
            json.dump({"upstream": upstream.lower(), "sha256": own}, fh_text)
        os.replace(tmp, record)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return own


_STORING: dict[Path, threading.Lock] = {}  # a lock per wheel being stored, for every proxy in this process
_STORING_LOCK = threading.Lock()


class _Server(ThreadingHTTPServer):
    # uv opens a connection per project at once (13 for torch's environment, 25 downloads). socketserver's
    # backlog of 5 let the kernel drop the other SYNs, which the client sends again a second later: every
    # resolution and every install waited a second for nothing.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-reply (pip stopped by a full disk, a build killed) is no error of ours:
        logged at debug, never a traceback on the terminal (socketserver prints one by default)."""
        log.debug("proxy: a request from %s ended early", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class PackageProxy:
    """A caching proxy of one or more PEP 503 simple indexes, for the builds of one cell.

    Index pages are fetched fresh by each proxy, once: every resolution of the build (a direct build resolves
    in each install step) sees the same index and waits for it once. Files are cached on disk by URL and shared
    by every proxy. A wheel served whole, whose link carries its index's digest, is also kept in stored form
    (store_wheel), which later proxies' pages offer in its place.
    `upstream_bytes` counts what this proxy had to download.
    """

    def __init__(
        self, upstreams: list[str], cache_dir: Path, context: ssl.SSLContext, links: list[Path] | None = None,
        *, host: str = LOOPBACK, apt: frozenset[str] = frozenset(), key: str = "", remote_links: tuple[str, ...] = (),
        prefetch: tuple[str, ...] = (),
    ) -> None:
        self.upstreams = upstreams
        self.key = key  # what the port is derived from (the cell's content hash); "" for any free port
        self.links = links or []
        self.remote_links = list(remote_links)  # find-links pages (URLs), merged into a direct build's index
        self.prefetch = prefetch  # projects whose pages are fetched as the proxy starts
        self.host = host
        self.apt = apt  # the mirrors (host[:port]) apt may reach through this proxy; empty: no apt route
        self.cache_dir = cache_dir
        self.context = context
        self.upstream_bytes = 0
        self.cached_bytes = 0
        self.fetched: dict[str, int] = {}  # file name -> bytes downloaded upstream by this proxy
        self._fetched_paths: set[Path] = set()  # served again later (uv: HEAD, ranges, GET), never "from cache"
        self.started = time.monotonic()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        # /files/ tokens are signed with a key of this proxy's own: it fetches only what its pages linked, never
        # a URL (file://, a metadata address) that a build step made up.
        self._key = os.urandom(16)
        # Where each page comes from: the indexes, then the find-links pages, each with its credentials. A file
        # token names its page's source, so that a file gets the credentials of the index that linked it (two
        # indexes on one host may hold different ones), and only on that index's scheme and host, as pip does.
        self._sources = [_split_auth(url) for url in [*upstreams, *self.remote_links]]
        self._pages: dict[str, str] = {}  # an index or find-links page, rewritten, fetched once per proxy
        self._storing: dict[Path, threading.Thread] = {}  # wheels being written in stored form, joined at exit
        self._stop, self._closed = threading.Event(), False
        # http(s) only, even through a redirect (no file:, ftp: or data: handler).
        self._opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                        urllib.request.HTTPDefaultErrorHandler(), _SameHostAuth(),
                        urllib.request.HTTPErrorProcessor(), urllib.request.HTTPSHandler(context=context)):
            self._opener.add_handler(handler)

    @property
    def url(self) -> str:
        assert self._server is not None
        return http_url(self.host, self._server.server_address[1])

    def build_args(self, direct: bool = False) -> dict[str, str]:
        """Build arguments that send apt (and a direct build's installs, to PACKAGES_HOST) through this proxy:
        Docker's predefined proxy arguments, which are set for RUN steps but kept out of the image, its
        history and the layer cache key. pip in a builder stage reaches the proxy directly (no_proxy); nothing
        when the proxy has neither route.
        """
        if not self.apt and not direct:
            return {}
        return {"http_proxy": self.url, "no_proxy": self.host}

    def __enter__(self) -> PackageProxy:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for part in self.cache_dir.glob("*/.part-*"):  # a download or store a killed run left, idle for an hour
            with contextlib.suppress(OSError):
                if time.time() - part.stat().st_mtime > 3600:
                    part.unlink()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy._handle(self)

            def do_HEAD(self) -> None:  # uv asks a file's size and range support before it reads its metadata
                proxy._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("proxy: " + format, *args)

        self._server = self._bind(Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        if self.prefetch:
            threading.Thread(target=self._prefetch, daemon=True).start()
        return self

    def _prefetch(self) -> None:
        """Fetch the pages of `prefetch` (the projects of the cell's last lock) on every index into this proxy's
        page memo, all at once, while the build's first steps run (apt takes seconds): the first resolution then
        waits for none (it had waited 1 to 3 s for its 13 pages). A page that fails here is asked again when a
        resolver asks for it, as any failure is; a project that is no longer in the lock costs one request."""
        from concurrent.futures import ThreadPoolExecutor

        def fetch(project: str, i: int) -> None:
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
                self._index_page(f"{self.upstreams[i]}/{project}/", i)

        names = sorted({_normalize(p) for p in self.prefetch if _PROJECT.fullmatch(p)})
        with ThreadPoolExecutor(max_workers=16) as pool:
            for project in names:
                for i in range(len(self.upstreams)):
                    pool.submit(fetch, project, i)

    def _bind(self, handler: type[BaseHTTPRequestHandler]) -> _Server:
        """Listen on the port derived from `key` when it is free, else a neighbour, else any.

        The proxy's URL is written into the builder stage's pip.conf, so a port that changes from run to run
        makes the classic builder's cache miss at `COPY sources/` and pip install everything again whenever
        anything after it changes (a model, a label). Derived from the cell, it stays the same between runs.
        """
        server = _Server6 if ":" in self.host else _Server
        for port in preferred_ports(self.key):
            try:
                return server((self.host, port), handler)
            except OSError:  # in use (a parallel build, another program): the next one
                continue
        return server((self.host, 0), handler)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            self._closed = True  # a request still finishing starts no store now
        if exc[0] is not None:  # a run that failed or was stopped waits for no store: each gives up
            self._stop.set()
        for thread in list(self._storing.values()):  # the next build's stored wheels, whole before the run ends
            thread.join()

    def token(self, url: str, source: int | None = None, digest: str = "") -> str:
        """The /files/ path segment for `url`, linked from a page of `source` (an index or find-links page)
        with `digest` ("algo=hex", the link's own): all three, signed by this proxy."""
        payload = f"{url}\n{'' if source is None else source}\n{digest}"
        mac = hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()[:32]
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=") + "." + mac

    def untoken(self, token: str) -> tuple[str, int | None, str] | None:
        """The URL, source and digest a token of this proxy names; None for anything else (forged, another
        proxy's, garbled)."""
        encoded, _, mac = token.partition(".")
        try:
            url, source, digest = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode().split("\n")
            index = int(source) if source else None
        except (ValueError, UnicodeDecodeError):
            return None
        expected = self.token(url, index, digest).partition(".")[2]
        return (url, index, digest) if mac.isascii() and hmac.compare_digest(mac, expected) else None

    def _auth_for(self, url: str, source: int | None) -> str | None:
        """The credentials of `source` where `url` is on its scheme and host; None elsewhere."""
        if source is None or not 0 <= source < len(self._sources):
            return None
        home, auth = self._sources[source]
        a, b = urllib.parse.urlsplit(home), urllib.parse.urlsplit(url)
        return auth if (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower()) else None

    def _open(self, url: str, accept: str, auth: str | None = None) -> Any:
        """`url` upstream; its own user:password@, else `auth`, go as Basic auth to its host alone."""
        url, own = _split_auth(url)
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {urllib.parse.urlsplit(url).scheme}:")
        request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "builder-proxy"})
        if own or auth:
            request.add_unredirected_header("Authorization", own or auth or "")
        return self._opener.open(request, timeout=120)

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path, parts = req.path, []
        try:
            if path.startswith("http://"):  # asked as a forward proxy (http_proxy): a direct build, or apt
                target = urllib.parse.urlsplit(path)
                if target.hostname == PACKAGES_HOST and target.port in (None, 80):
                    path = target.path + (f"?{target.query}" if target.query else "")
            parts = path.split("?")[0].strip("/").split("/")
            if path.startswith("http://"):
                self._apt(req, path)
            elif len(parts) == 2 and parts[0] == "simple":  # every index and find-links as one (a direct build)
                self._page(req, list(range(len(self.upstreams))), parts[1], merged=True)
            elif len(parts) == 3 and parts[0].isdigit() and parts[1] == "simple":
                self._page(req, [int(parts[0])], parts[2])
            elif len(parts) == 3 and parts[0] in ("files", "stored") and (signed := self.untoken(parts[1])) is not None:
                self._file(req, *signed, parts[2], stored=parts[0] == "stored")
            elif len(parts) in (2, 3) and parts[0] == "links" and parts[1].isdigit():
                self._link(req, int(parts[1]), parts[2] if len(parts) == 3 else None)
            else:
                req.send_error(404)
        except _ClientGone:
            log.debug("proxy: the client of %s hung up", parts[-1] if parts else "/")
        except urllib.error.HTTPError as exc:
            req.send_error(exc.code, str(exc.reason))
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            # Named by the file, not the path: a path's token encodes the upstream URL, credentials and all.
            what = parts[-1] if parts and parts[-1] else "index"
            with self._lock:
                self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            req.send_error(502, f"upstream failed: {type(exc).__name__}")

    def _page(self, req: BaseHTTPRequestHandler, indexes: list[int], project: str, merged: bool = False) -> None:
        """One index's page for `project`, its links through this proxy; `merged`: the links of every index,
        wheelhouse and find-links page in one page, as pip and uv (unsafe-best-match) weigh them together."""
        if (any(i >= len(self.upstreams) for i in indexes) or (not indexes and not merged)
                or not _PROJECT.fullmatch(project)):
            req.send_error(404)
            return
        bodies: list[str] = []
        for i in indexes:
            try:
                bodies.append(self._index_page(f"{self.upstreams[i]}/{project}/", i))
            except urllib.error.HTTPError as exc:
                # A project one index lacks is no error of the merged page: 404, or 403 from an index that needs no
                # credentials (PyTorch's). A 403 with credentials is theirs: an error, never a silent fall-back.
                if not merged or not (exc.code == 404 or (exc.code == 403 and self._sources[i][1] is None)):
                    raise
                log.debug("proxy: index %d has no %s (%d)", i, project, exc.code)
        if not merged:
            self._send(req, bodies[0].encode(), "text/html; charset=utf-8")
            return
        name = _normalize(project)
        anchors = [a for body in bodies for a in _ANCHOR.findall(body)]
        for j, link in enumerate(self.remote_links):  # find-links pages: only this project's files, by file name
            page = self._link_page(link, len(self.upstreams) + j)
            anchors += [a for a in _ANCHOR.findall(page) if _project_of(_file_name(a)) == name]
        for i, folder in enumerate(self.links):
            anchors += [f'<a href="/links/{i}/{p.name}">{p.name}</a>' for p in sorted(folder.iterdir())
                        if p.is_file() and _project_of(p.name) == name]
        if not anchors:
            req.send_error(404)
            return
        page = "<!DOCTYPE html>\n<html><body>\n" + "<br/>\n".join(anchors) + "\n</body></html>\n"
        self._send(req, page.encode(), "text/html; charset=utf-8")

    def _index_page(self, url: str, source: int) -> str:
        """An index's (or find-links) page, rewritten, once per proxy (two first requests at the same moment may
        each fetch it; the later one is kept). A failure is not kept here: the next request asks again."""
        with self._lock:
            page = self._pages.get(url)
        if page is None:
            page = self._rewritten(url, source)
            with self._lock:
                self._pages[url] = page
        return page

    def _link_page(self, url: str, source: int) -> str:
        """A find-links page, rewritten, once per proxy (every project's page reads it). One that cannot be read
        offers nothing, as pip skips it with a warning; its error is kept for the build's message."""
        try:
            return self._index_page(url, source)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            with self._lock:
                # By its number: the URL may hold a token or credentials. Kept as empty: not asked again.
                self.errors.append(f"find-links page {source - len(self.upstreams) + 1}: {type(exc).__name__}: {exc}")
                self._pages[url] = ""
            return ""

    def _rewritten(self, page_url: str, source: int) -> str:
        """The page at `page_url` (of index or find-links page `source`), each of its links made a link to this
        proxy's cache."""
        with self._open(page_url, "text/html") as resp:
            body = resp.read().decode("utf-8", "replace")
            page_url = resp.geturl()
        parser = _Links()
        parser.feed(body)
        hrefs = set(parser.hrefs)

        def local(match: re.Match[str]) -> str:
            href = match[1]
            if href not in hrefs:
                return match[0]
            absolute, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
            name = absolute.rsplit("/", 1)[-1]
            # A wheel with the index's digest is offered in stored form where the cache has it, under its own
            # sha256 (which the installer checks as it would the index's); its token keeps the index's digest.
            digest = fragment if name.endswith(".whl") and fragment.partition("=")[0] in _DIGESTS else ""
            stored = stored_digest(self._cache_path(absolute), digest) if digest else None
            token = self.token(absolute, source, digest)
            if stored:
                return f'href="/stored/{token}/{name}#sha256={stored}"'
            return f'href="/files/{token}/{name}' + (f"#{fragment}" if fragment else "") + '"'

        # One pass over the page: a str.replace per link was quadratic (grpcio's page, 11,282 links: 28 s).
        return _HREF.sub(local, body)

    def _link(self, req: BaseHTTPRequestHandler, index: int, name: str | None) -> None:
        """A local find-links folder: served as is, never counted as upstream bytes."""
        if index >= len(self.links):
            req.send_error(404)
            return
        folder = self.links[index]
        if name is None:
            anchors = "".join(f'<a href="{p.name}">{p.name}</a>\n' for p in sorted(folder.iterdir()) if p.is_file())
            self._send(req, f"<html><body>\n{anchors}</body></html>\n".encode(), "text/html")
            return
        name = urllib.parse.unquote(name)  # pip asks for a local version's `+` as %2B
        path = folder / name
        if "/" in name or not path.is_file():
            req.send_error(404)
            return
        self._send_file(req, path)

    def _send(self, req: BaseHTTPRequestHandler, data: bytes, kind: str) -> None:
        req.send_response(200)
        req.send_header("Content-Type", kind)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            self._write(req, data)

    @staticmethod
    def _write(req: BaseHTTPRequestHandler, data: bytes) -> None:
        try:
            req.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ClientGone from exc

    def _send_file(self, req: BaseHTTPRequestHandler, path: Path, *, from_cache: bool = False) -> None:
        """`path`, whole or the one byte range asked for (uv reads a wheel's metadata from its end when the
        index publishes none). `from_cache`: count what is sent as served from the cache (before sending, so
        that a client that has its bytes sees them counted)."""
        size = path.stat().st_size
        first, last = _byte_range(req.headers.get("Range"), size) if req.command == "GET" else (0, size - 1)
        if first > last and size:
            req.send_response(416)
            req.send_header("Content-Range", f"bytes */{size}")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        partial = (first, last) != (0, size - 1)
        req.send_response(206 if partial else 200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Accept-Ranges", "bytes")
        if partial:
            req.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        length = max(0, last - first + 1)
        req.send_header("Content-Length", str(length))
        req.end_headers()
        if req.command == "HEAD":
            return
        if from_cache:
            with self._lock:
                self.cached_bytes += length
        # sendfile(2): the kernel copies the bytes, none through Python's buffers, leaving the CPU to the install it
        # serves (torch's 800 MB wheel from the page cache: 0.10 s of CPU, not 0.27 s). It refuses a count of 0.
        if not length:
            return
        with path.open("rb") as fh:
            try:
                req.connection.sendfile(fh, first, length)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise _ClientGone from exc

    def _apt(self, req: BaseHTTPRequestHandler, url: str) -> None:
        """apt's request as to a forward proxy: only to the base's mirrors, only plain http.

        Files under pool/ never change under one name, and an index apt asks by its hash (dists/.../by-hash/,
        which Debian's and Ubuntu's Release files offer) is named by its content: both are cached like wheels.
        The Release files that name those hashes (dists/*/InRelease) are fetched fresh every time, so a build
        sees the mirror as it is now and waits only for what changed (the bookworm main index: 8.8 MB).
        """
        parsed = urllib.parse.urlsplit(url)
        if _netloc(parsed.netloc) not in self.apt or parsed.username or parsed.password:
            req.send_error(403, "not a mirror of this build's base")
            return
        name = parsed.path.rsplit("/", 1)[-1]
        if ("/pool/" in parsed.path or "/by-hash/" in parsed.path) and name and not parsed.query:
            self._cached(req, url, name)
            return
        with self._open(url, "*/*") as resp:
            data = resp.read()
            kind = resp.headers.get("Content-Type", "application/octet-stream")
        with self._lock:
            self.upstream_bytes += len(data)
        self._send(req, data, kind)

    def _file(self, req: BaseHTTPRequestHandler, upstream: str, source: int | None, digest: str, name: str,
              *, stored: bool = False) -> None:
        """The file a signed link names (by its own name, `+` or `%2B` alike), or the PEP 658 metadata beside it:
        nothing else, so that no request writes a cache file of another name."""
        base = urllib.parse.unquote(upstream.rsplit("/", 1)[-1])
        auth = self._auth_for(upstream, source)
        asked = urllib.parse.unquote(name)
        if base and asked == f"{base}.metadata":
            self._cached(req, upstream + ".metadata", name, auth)
        elif asked != base or (stored and not digest):
            req.send_error(404)
        elif not stored:
            path = self._cached(req, upstream, name, auth)
            if digest.partition("=")[0] in _DIGESTS and req.command == "GET" and "Range" not in req.headers:
                self._store_later(path, digest)  # after a whole download: a HEAD or a metadata range is no install
        else:
            original = self._cache_path(upstream)
            if stored_digest(original, digest) is None:  # its page offered it, and the cache lost it: made again
                if not original.exists():
                    self._download(upstream, original, name, auth)
                store_wheel(original, digest)
            self._send_file(req, stored_paths(original)[0], from_cache=True)

    def _store_later(self, path: Path, digest: str) -> None:
        """Write the stored form of the wheel at `path` (just served as the index has it) for later builds, in the
        background at the lowest CPU priority, so that it takes no time from the install it runs beside."""
        def store() -> None:
            try:
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                store_wheel(path, digest, self._stop)
            except Exception as exc:  # served as the index has it, as before; a thread's last word is one line
                if self._stop.is_set():  # the run failed or was stopped: the next one stores it
                    return
                why = str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
                log.warning("package cache: %s not stored for later builds: %s", path.name.split("-", 1)[-1], why)

        with self._lock:
            if self._closed or path in self._storing or stored_digest(path, digest) is not None:
                return
            self._storing[path] = thread = threading.Thread(target=store, daemon=True)
        thread.start()

    def _cache_path(self, upstream: str) -> Path:
        """Where `upstream` is cached: by its URL, named by its own file name (never by what a request asked)."""
        key = hashlib.sha256(upstream.encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key[2:16]}-{upstream.rsplit('/', 1)[-1]}"

    def _cached(self, req: BaseHTTPRequestHandler, upstream: str, name: str, auth: str | None = None) -> Path:
        """`upstream` from the shared cache, downloading it first if this is the first time; returns its path."""
        path = self._cache_path(upstream)
        if not path.exists():
            self._download(upstream, path, name, auth)
        with self._lock:
            from_cache = path not in self._fetched_paths
        self._send_file(req, path, from_cache=from_cache)
        return path

    def _download(self, upstream: str, path: Path, name: str, auth: str | None) -> None:
        """`upstream` into the cache at `path`, counted as fetched under `name`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, self._open(upstream, "*/*", auth) as resp:
                # Counted as it arrives: the build's progress line moves during a 800 MB wheel, not after it.
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    with self._lock:
                        self.upstream_bytes += len(chunk)
                fetched = out.tell()
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != fetched:
                    raise OSError(f"upstream sent {fetched} of {length} bytes")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        with self._lock:
            self.fetched[name] = self.fetched.get(name, 0) + fetched
            self._fetched_paths.add(path)


@contextmanager
def serve(sources: Sources, primary_index: str | None, *, host: str = LOOPBACK,
          apt: frozenset[str] = frozenset(), key: str = "", prefetch: Iterable[str] = (),
          ) -> Iterator[tuple[dict[str, bytes], PackageProxy | None]]:
    """The sources/ files for one cell's build, with its proxy running on `host` while the build runs.

    `apt`: the mirrors the proxy may forward apt to (see PackageProxy.build_args); empty for none.
    `key`: the cell's content hash, from which the proxy's port (and so the sources/ files) is derived.
    `prefetch`: projects whose index pages the proxy fetches as it starts (see PackageProxy).
    """
    if not sources.proxy:
        yield sources.context_files(primary_index, None), None
        return
    upstreams = sources.indexes_for(primary_index)
    with PackageProxy(upstreams, sources.cache_dir, sources.ssl_context(), sources.local_links(), host=host,
                      apt=apt, key=key, remote_links=tuple(u for u in sources.find_links if "://" in u),
                      prefetch=tuple(prefetch)) as proxy:
        yield sources.context_files(primary_index, proxy.url), proxy
