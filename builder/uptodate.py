"""The no-op fast path: say "up to date" for a selection whose images all exist, without loading the pipeline.

An up-to-date `build` used to pay for importing the Docker SDK, pydantic, Jinja2 and rich (about half a second
of CPU), validating the matrix and rendering every cell, and then asked the engine three questions per cell.
A fully cached `docker build` takes about 0.1 s. So, after a build in which every cell succeeded, `build` leaves
a stamp: the selected cells' tags and content hashes, and the base image ids they were hashed against, under a
key made of everything that decides those hashes (the matrix file, the selectors, the templates and the code that
expands and renders). The next `build` with the same key asks the engine two read-only questions over its local
socket (the images carrying a content-hash label, and each base's id) and, if every cell's image is there under
its tag and every base is unchanged, prints the same summary and stops. Anything else (no stamp, a remote or
non-default engine, a moved base, a missing image or tag, any error) falls through to the full path, which
decides for itself: this module can only skip work the full path would also skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import assets, labels

HASH_LABEL = labels.HASH
PACKAGE = Path(__file__).resolve().parent
# What decides the cells and their content hashes, besides the matrix file and the selectors.
# Every module of the package and the matrix package: any code change re-checks by the full path (cheap to
# read, and no list of "the modules that render" to keep in step with the code).
INPUTS = ("*.py", "matrix/*.py")
DEFAULT_SOCKET = "/var/run/docker.sock"
TEMPLATES = assets.TEMPLATES  # builder.render.TEMPLATES: the checkout's templates/ or an installed copy


@dataclass(frozen=True, kw_only=True)
class Stamped:
    tag: str
    content_hash: str
    base: str  # the base image reference
    base_id: str  # the id the content hash was computed against


def key(matrix: Path, selectors: list[str]) -> str:
    """Everything that decides which cells a selection has and what their hashes are."""
    digest = hashlib.sha256()
    digest.update(b"selectors\0" + json.dumps(selectors).encode() + b"\0")
    digest.update(b"matrix\0" + matrix.read_bytes() + b"\0")
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
    tmp.write_text(json.dumps({"key": stamp_key, "cells": [c.__dict__ for c in cells]}, indent=1) + "\n")
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


@dataclass(frozen=True, kw_only=True)
class Found:
    tag: str
    image_id: str
    size: int


def check(cells: list[Stamped], sock: str) -> list[Found] | None:
    """Every stamped cell's image, if all are there under their tags on unchanged bases; else None."""
    try:
        for base in {c.base: c.base_id for c in cells}.items():
            info = _get(sock, f"/images/{urllib.parse.quote(base[0], safe='')}/json")
            if info is None or info.get("Id") != base[1]:
                return None
        filters = urllib.parse.quote(json.dumps({"label": [HASH_LABEL]}))
        images = _get(sock, f"/images/json?filters={filters}") or []
    except (OSError, ValueError, IndexError):
        return None
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for image in images:
        by_hash.setdefault(str((image.get("Labels") or {}).get(HASH_LABEL)), []).append(image)
    found = []
    for cell in cells:
        image = next((i for i in by_hash.get(cell.content_hash, []) if cell.tag in (i.get("RepoTags") or [])), None)
        if image is None:
            return None
        found.append(Found(tag=cell.tag, image_id=str(image["Id"]), size=int(image.get("Size") or 0)))
    return found
