"""Check the matrix's framework facts against the packages' own metadata on the index.

For each framework version built from the default index, the JSON simple index (PEP 691) lists the
wheels that exist, which gives the Python range, and the wheel's METADATA (PEP 658, a few KB) gives the
exact cuDNN pin. Uploads without a `.metadata` file (TF up to 2.18, some torch wheels) are reported as
unavailable, not guessed.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.parser import Parser

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from builder.errors import SourceError
from builder.matrix.model import Matrix, printable
from builder.sources import Sources

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
CUDNN = re.compile(r"^nvidia-cudnn-cu\d+$")


@dataclass(frozen=True, kw_only=True)
class Fact:
    framework: str
    version: str
    line: str
    fact: str
    matrix: str
    index: str
    where: str

    @property
    def verdict(self) -> str:
        if self.index == "unavailable":
            return "unavailable"
        if self.index[:1] in "<>=!~" and self.matrix[:1].isdigit():
            # The index gives a range (TF 2.20): the matrix's exact pin must fall inside it.
            return "ok" if SpecifierSet(self.index).contains(self.matrix) else "differs"
        return "ok" if self.matrix == self.index else "differs"


def linux_wheels(files: list[dict[str, object]], package: str, version: str) -> dict[str, dict[str, object]]:
    """cpXY -> the file entry of its manylinux x86_64 wheel of `version`."""
    found: dict[str, dict[str, object]] = {}
    for entry in files:
        name = str(entry.get("filename", ""))
        if not name.endswith(".whl"):
            continue
        try:
            dist, ver, _, tags = parse_wheel_filename(name)
        except InvalidWheelFilename:
            continue
        if dist != canonicalize_name(package) or str(ver).split("+")[0] != version:
            continue
        for tag in tags:
            if tag.interpreter.startswith("cp") and "x86_64" in tag.platform and "linux" in tag.platform:
                found.setdefault(tag.interpreter, entry)
    return found


def python_range(wheels: dict[str, dict[str, object]]) -> list[str]:
    versions = [f"{cp[2]}.{cp[3:]}" for cp in wheels if len(cp) >= 4]
    return sorted(versions, key=Version)


def cudnn_pin(metadata: str) -> str | None:
    """The exact nvidia-cudnn-cu* version a wheel's METADATA requires, ignoring extras."""
    for value in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        try:
            req = Requirement(value)
        except InvalidRequirement:
            continue
        if req.marker is not None and "extra" in str(req.marker) and "and-cuda" not in str(req.marker):
            continue
        if CUDNN.match(req.name):
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if pins:
                return pins[0]
            return str(req.specifier) or None
    return None


# Limits on what an index may send: the torch and tensorflow PEP 691 pages are a few MB, a METADATA file a
# few KB. A reply past these, or one that takes longer than DEADLINE_S in all, is refused, not read on.
MAX_PAGE = 64 << 20
MAX_METADATA = 4 << 20
TIMEOUT_S = 30.0  # one connect or read
DEADLINE_S = 300.0  # one whole reply


def redact(url: str) -> str:
    """`url` fit for a message: no user or password, escaped, cut short."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        if "@" in parts.netloc:
            netloc = "***@" + netloc
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        url = "(an unreadable URL)"
    return printable(url, 120)


class Index:
    """The JSON simple index (PEP 691) and PEP 658 metadata of one index URL.

    Credentials in the URL (https://user:token@host/simple) are sent as HTTP basic auth, only to that
    host, never on a redirect elsewhere, and never shown: messages name the URL with `***@`.
    Every failure is a one-line SourceError that says what the index served.
    """

    def __init__(self, sources: Sources) -> None:
        self.shown = redact(sources.index_url)
        try:
            parts = urllib.parse.urlsplit(sources.index_url)
            port = parts.port
        except ValueError:
            raise SourceError(f"index URL {self.shown} is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(
                c.isspace() or not c.isprintable() for c in sources.index_url):
            raise SourceError(f"index URL {self.shown} is not an http(s) URL with a host")
        self.host = (parts.hostname, port)
        self.auth: str | None = None
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        netloc = parts.netloc.rpartition("@")[2]
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), parts.query, ""))
        try:
            self.context = sources.ssl_context()
        except (OSError, ValueError) as exc:
            raise SourceError(f"CA bundle {printable(str(sources.ca_bundle))} cannot be used: "
                              f"{printable(str(exc), 120)}") from None

    def _same_host(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return (parts.hostname, parts.port) == self.host

    def _get(self, url: str, accept: str, limit: int, what: str) -> tuple[bytes, str]:
        """The body (at most `limit` bytes) and Content-Type of `url`. HTTPError passes through; every other
        failure is a SourceError."""
        req = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "builder-facts"})
        if self.auth and self._same_host(url):
            req.add_unredirected_header("Authorization", self.auth)  # not forwarded by a redirect
        deadline = time.monotonic() + DEADLINE_S
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=self.context) as resp:
                chunks, size = [], 0
                while chunk := resp.read(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise SourceError(f"index {self.shown} sent more than {limit >> 20} MiB for {what}; "
                                          "refused")
                    if time.monotonic() > deadline:
                        raise SourceError(f"index {self.shown} took over {DEADLINE_S:.0f} s to send {what}")
                announced = str(resp.headers.get("Content-Length", "") or "")
                if announced.isdigit() and int(announced[:18]) != size:
                    raise SourceError(f"index {self.shown} failed while sending {what}: it sent {size} of the "
                                      f"{printable(announced, 20)} bytes it announced")
                return b"".join(chunks), str(resp.headers.get("Content-Type", "") or "")
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError as exc:
            raise SourceError(f"cannot reach index {self.shown} for {what}: {printable(str(exc.reason), 120)}") \
                from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise SourceError(f"index {self.shown} failed while sending {what}: "
                              f"{printable(str(exc) or type(exc).__name__, 120)}") from None

    def files(self, package: str) -> list[dict[str, object]]:
        """The files the index lists for `package`: SourceError if it serves anything but a PEP 691 page
        that lists some."""
        name = canonicalize_name(package)
        what = f"the {name} page"
        url = f"{self.base}/{name}/"
        try:
            body, ctype = self._get(url, SIMPLE_JSON, MAX_PAGE, what)
        except urllib.error.HTTPError as exc:
            raise SourceError(f"index {self.shown} answered HTTP {exc.code} for {what}") from None
        start = printable(body[:60].decode("utf-8", "replace"), 60)
        kind = ctype.split(";")[0].strip().lower()
        if kind not in (SIMPLE_JSON, "application/json"):
            raise SourceError(f"index {self.shown} served {printable(kind or 'no content type', 60)} for {what}, "
                              f"not PEP 691 JSON ({SIMPLE_JSON}); it starts {start!r}")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise SourceError(f"index {self.shown} served invalid JSON for {what}; it starts {start!r}") from None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("filename"), str) and isinstance(f.get("url"), str)
                for f in files):
            raise SourceError(f"index {self.shown} served JSON of the wrong shape for {what}: PEP 691 needs "
                              "a 'files' list of objects with 'filename' and 'url'")
        if not files:
            raise SourceError(f"index {self.shown} lists no files for {name}")
        for entry in files:  # relative URLs are relative to the page (PEP 691)
            entry["url"] = urllib.parse.urljoin(url, str(entry["url"]))
        return files

    def metadata(self, entry: dict[str, object]) -> str | None:
        """The wheel's METADATA (PEP 658), or None where the index has none. Tried even when the index does not
        advertise it: PyPI often has it."""
        url = urllib.parse.urldefrag(str(entry["url"]))[0] + ".metadata"
        what = f"the METADATA of {printable(str(entry.get('filename', '?')), 80)}"
        try:
            body, _ = self._get(url, "*/*", MAX_METADATA, what)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise SourceError(f"index {self.shown} answered HTTP {exc.code} for {what}") from None
        return body.decode("utf-8", "replace")


def check(matrix: Matrix, index: Index, frameworks: set[str] | None = None) -> list[Fact]:
    """Compare each default-index build's Python range and cuDNN pin with the index's metadata."""
    facts: list[Fact] = []
    for fw_name, fw in matrix.spec.frameworks.items():
        if frameworks and fw_name not in frameworks:
            continue
        package_files = index.files(fw.package)
        for version, fv in fw.versions.items():
            wheels = linux_wheels(package_files, fw.package, version)
            vpath = ("frameworks", fw_name, "versions", version)
            where = matrix.where((*vpath, "python"))
            have = python_range(wheels) or ["unavailable"]
            claimed = sorted(fv.python, key=Version)
            facts.append(Fact(framework=fw_name, version=version, line="*", fact="python", where=where,
                              matrix=", ".join(claimed), index=", ".join(have)))
            for line, build in fv.builds.items():
                if line == "cpu" or build.index != "pypi" or build.cuda_source != "wheels":
                    continue
                # Not every upload of a release has its METADATA served: use the first that does.
                meta = next((m for e in wheels.values() if (m := index.metadata(e)) is not None), None)
                pin = cudnn_pin(meta) if meta else None
                facts.append(Fact(framework=fw_name, version=version, line=line, fact="cudnn",
                                  matrix=build.cudnn or "-", index=pin or "unavailable",
                                  where=matrix.where((*vpath, "builds", line, "cudnn"))))
    return facts

