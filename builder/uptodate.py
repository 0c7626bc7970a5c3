"""The no-op fast path: say "up to date" for a selection whose images all exist, without loading the pipeline.

An up-to-date `build` used to pay for importing the Docker SDK, pydantic, Jinja2 and rich (about half a second
of CPU), validating the matrix and rendering every cell, and then asked the engine three questions per cell.
A fully cached `docker build` takes about 0.1 s. So, after a build in which every cell succeeded, `build` leaves
a stamp: the selected cells' tags and content hashes, and the base image ids they were hashed against, under a
key made of everything that decides those hashes (the matrix file, the selectors, the templates and the code that
expands and renders). The next `build` with the same key asks the engine read-only questions over its local
socket (each base's id, and each cell's image or, for many cells, the images carrying a content-hash label) and,
if every cell's image is there under its tag and every base is unchanged, prints the same summary and stops.
Anything else (no stamp, a remote or non-default engine, a moved base, a missing image or tag, any error) falls
through to the full path, which decides for itself: this module can only skip work the full path would also skip.

`cli.main` asks this module before it builds its argument parser: `parse_build` reads a plain `build` command
line (exact option names only; anything it does not know, `--force`, `--no-cache`, an abbreviation, `--help`,
goes to argparse and the full path), so an up-to-date `build` imports only the standard library's socket,
hashlib and json besides cli's own few modules, and asks the engine one question per base and per cell (or one
for all of many cells).
The key also covers the Python version and the installed versions of the libraries that load and render a
matrix (a Jinja2 or PyYAML upgrade could change a rendered file, so it re-checks by the full path).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from builder import assets, labels

HASH_LABEL = labels.HASH
PACKAGE = Path(__file__).resolve().parent
# What decides the cells and their content hashes, besides the matrix file and the selectors.
# Every module of the package and the matrix package: any code change re-checks by the full path (cheap to
# read, and no list of "the modules that render" to keep in step with the code).
INPUTS = ("*.py", "matrix/*.py")
DEFAULT_SOCKET = "/var/run/docker.sock"
TEMPLATES = assets.TEMPLATES  # builder.render.TEMPLATES: the checkout's templates/ or an installed copy
# The libraries whose output decides a cell's files (PyYAML and pydantic load the matrix, Jinja2 and MarkupSafe
# render it, packaging compares versions), as their distributions' normalized names.
LIBRARIES = frozenset({"pyyaml", "pydantic", "pydantic_core", "jinja2", "markupsafe", "packaging"})
SELECTORS = ("cuda", "python", "framework", "flavor", "only")
INSPECT_MAX = 16  # cells asked for one by one; more are listed in one question (see check)
SELECTORS_OPTIONS = tuple(f"--{name}" for name in SELECTORS)


class Stamped(NamedTuple):
    tag: str
    content_hash: str
    base: str  # the base image reference
    base_id: str  # the id the content hash was computed against


def selectors(values: Mapping[str, Iterable[str] | None]) -> list[str]:
    """A selection in the key's words: name=value for each selector, each name's values sorted and unique."""
    return [f"{name}={value}" for name in SELECTORS for value in sorted(set(values.get(name) or ()))]


def library_versions(path: Iterable[str]) -> list[str]:
    """The installed distributions of LIBRARIES on an import path, as their `.dist-info` folder names (name and
    version: `jinja2-3.1.4.dist-info`), in path order. Read from directory listings, not importlib.metadata."""
    found = []
    for folder in path:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for name in sorted(names):
            if name.endswith(".dist-info") and name.partition("-")[0].lower().replace(".", "_") in LIBRARIES:
                found.append(name)
    return found


def key(matrix: Path, selectors: list[str]) -> str:
    """Everything that decides which cells a selection has and what their hashes are."""
    digest = hashlib.sha256()
    digest.update(b"selectors\0" + json.dumps(selectors).encode() + b"\0")
    digest.update(b"matrix\0" + matrix.read_bytes() + b"\0")
    digest.update(b"python\0" + sys.version.encode() + b"\0")
    for library in library_versions(sys.path):
        digest.update(b"library\0" + library.encode() + b"\0")
    paths: list[Path] = []
    for pattern in INPUTS:
        paths += sorted(PACKAGE.glob(pattern))
    paths += sorted(p for p in TEMPLATES.rglob("*") if p.is_file())
    for path in paths:
        digest.update(str(path.relative_to(PACKAGE.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp_path(state_dir: Path, stamp_key: str) -> Path:
    return state_dir / "uptodate" / f"{stamp_key[:32]}.json"


def write_stamp(state_dir: Path, stamp_key: str, cells: list[Stamped]) -> None:
    path = stamp_path(state_dir, stamp_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": stamp_key, "cells": [c._asdict() for c in cells]}, indent=1) + "\n")
    os.replace(tmp, path)


def read_stamp(state_dir: Path, stamp_key: str) -> list[Stamped] | None:
    try:
        data = json.loads(stamp_path(state_dir, stamp_key).read_text())
        if data.get("key") != stamp_key:
            return None
        return [Stamped(**c) for c in data["cells"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def local_socket(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The engine's unix socket when the engine is the default local one; None for any other set-up."""
    if environ.get("DOCKER_CONTEXT") not in (None, "", "default"):
        return None
    host = environ.get("DOCKER_HOST")
    if host:
        return host.removeprefix("unix://") if host.startswith("unix://") else None
    config = Path(environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"
    try:
        current = json.loads(config.read_text()).get("currentContext")
    except (OSError, ValueError, AttributeError):
        current = None
    return DEFAULT_SOCKET if current in (None, "", "default") else None


def _get(sock_path: str, path: str) -> Any:
    """GET over the engine's unix socket, as HTTP/1.0 (one request a connection, no chunked bodies): the
    standard library's http.client would import the email package, a third of this path's time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(sock_path)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
    if status == b"404":
        return None
    if status != b"200":
        raise OSError(f"engine answered {status.decode(errors='replace')} to {path}")
    return json.loads(body)


class Found(NamedTuple):
    tag: str
    image_id: str
    size: int


def check(cells: list[Stamped], sock: str) -> list[Found] | None:
    """Every stamped cell's image, if all are there under their tags on unchanged bases; else None.

    One question per distinct base (its id), then, for up to INSPECT_MAX cells, one per cell (its tag's image:
    under a millisecond each), or else one for all the cells: the images that carry a content-hash label and
    one of the cells' tags (the engine ORs the values of one filter and ANDs the filters; it walks every image
    it holds for that, 15 to 20 ms with a hundred)."""
    try:
        for base, base_id in {c.base: c.base_id for c in cells}.items():
            info = _get(sock, f"/images/{urllib.parse.quote(base, safe='')}/json")
            if info is None or info.get("Id") != base_id:
                return None
        images: list[dict[str, Any]] = []
        if len(cells) <= INSPECT_MAX:
            for cell in cells:
                info = _get(sock, f"/images/{urllib.parse.quote(cell.tag, safe='')}/json")
                if info is None:
                    return None
                images.append({**info, "Labels": (info.get("Config") or {}).get("Labels")})
        else:
            wanted = {"label": [HASH_LABEL], "reference": sorted({c.tag for c in cells})}
            images = _get(sock, f"/images/json?filters={urllib.parse.quote(json.dumps(wanted))}") or []
    except (OSError, ValueError, IndexError, AttributeError, TypeError):  # an answer of another shape
        return None
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for listed in images:
        by_hash.setdefault(str((listed.get("Labels") or {}).get(HASH_LABEL)), []).append(listed)
    found = []
    for cell in cells:
        image = next((i for i in by_hash.get(cell.content_hash, []) if cell.tag in (i.get("RepoTags") or [])), None)
        if image is None:
            return None
        found.append(Found(tag=cell.tag, image_id=str(image["Id"]), size=int(image.get("Size") or 0)))
    return found


class Invocation(NamedTuple):
    """A `build` command line as the fast path reads it."""

    matrix: str
    state: str
    selectors: list[str]
    jobs: int


# `build`'s options that take a value and do not change which images a selection needs (the package sources
# and the model mirror decide how a missing image is built, not its content hash). -j and the selectors are
# read; anything else (--force, --no-cache, --help, an abbreviation, a value that starts with "-") is left to
# argparse.
_SOURCES = frozenset({"--ca-bundle", "--index-url", "--extra-index-url", "--find-links", "--cache-dir",
                      "--model-mirror"})
_FLAGS = frozenset({"--no-proxy", "--fail-fast"})
_FLAVORS = ("runtime", "devel")


def parse_build(argv: list[str], environ: Mapping[str, str] = os.environ) -> Invocation | None:
    """`[--matrix M] [--debug] build [exact build options]`, read the way argparse reads it; None for anything
    else (the full parser decides then). Defaults are cli.parser()'s: $BUILDER_MATRIX, $BUILDER_STATE."""
    matrix, state = environ.get("BUILDER_MATRIX", "matrix.yaml"), environ.get("BUILDER_STATE", ".builder")
    values: dict[str, list[str]] = {}
    jobs, command, i = 1, False, 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if not command and token == "build":
            command = True
        elif (token == "--debug" and not command) or (token in _FLAGS and command):
            pass  # logging's level; a source option that changes no image
        elif token.startswith("-j") and len(token) > 2 and command:  # -j2
            name, value, eq = "-j", token[2:], "="
        elif name in ("--matrix", "--state", "--jobs", "-j", *SELECTORS_OPTIONS, *_SOURCES):
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    return None
                i, value = i + 1, argv[i + 1]
            if (name == "--matrix") == command:  # --matrix belongs before the command, the rest after it
                return None
        else:
            return None
        if name == "--matrix":
            matrix = value
        elif name == "--state":
            state = value
        elif name in ("-j", "--jobs"):
            if not (value.isascii() and value.isdigit() and len(value) <= 3 and 1 <= int(value) <= 64):
                return None
            jobs = int(value)
        elif name in SELECTORS_OPTIONS:
            if name == "--flavor" and value not in _FLAVORS:
                return None
            values.setdefault(name[2:], []).append(value)
        i += 1
    return Invocation(matrix=matrix, state=state, selectors=selectors(values), jobs=jobs) if command else None

