"""Pretrained models for the images: fetched once into the host cache, verified, and laid out as image layers.

A model is cached under its sha256 (`<cache>/models/<sha256>`), so a model shared by many cells is fetched
once. Its layer is a tar made here with fixed metadata, holding the file where the hub's own loading code
looks for it (torch.hub: $TORCH_HOME/hub/checkpoints/<file name>; tensorflow_hub: $TFHUB_CACHE_DIR/<sha1 of
the handle>, with the descriptor file it writes), so equal models give equal layers in every image.
A mirror (--model-mirror, $BUILDER_MODEL_MIRROR) changes where the bytes come from, never where they go:
the layer is keyed by the canonical URL. A mirror URL may hold credentials; they reach no log, image or label.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import logging
import os
import posixpath
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from builder.errors import SourceError
from builder.matrix.model import Model, printable

log = logging.getLogger("builder")

MIRROR_ENV = "BUILDER_MODEL_MIRROR"
TORCH_HOME = "/opt/models/torch"
TFHUB_CACHE_DIR = "/opt/models/tfhub"
# tensorflow_hub asks a hub for the compressed format with this query (compressed_module_resolver.py).
TFHUB_COMPRESSED_QUERY = "tf-hub-format=compressed"
# The most one model may be: a larger download is refused before it fills the disk.
MAX_BYTES = 64 << 30
# The most a TF Hub module's tar may hold once uncompressed, and how many entries.
MAX_UNPACKED = 64 << 30
MAX_MEMBERS = 100_000
CHUNK = 1 << 20
TIMEOUT_S = 60.0

_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


class ModelError(SourceError):
    """A model could not be fetched, did not match its sha256, or cannot be laid out."""


@dataclass(frozen=True, kw_only=True)
class Fetched:
    model: Model
    path: Path  # the verified file in the host cache
    fetched: int  # bytes downloaded for it by this call (0: it was in the cache)


# --------------------------------------------------------------------------------------------- where
def mirror_from(flag: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The model mirror: the flag, else $BUILDER_MODEL_MIRROR, else None (the canonical URLs)."""
    env = os.environ if environ is None else environ
    value = (flag or env.get(MIRROR_ENV) or "").strip()
    if not value:
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(f"model mirror {shown(value)}: give an http(s) URL such as http://mirror.example:8080 "
                         f"(--model-mirror or ${MIRROR_ENV})")
    return value


def shown(url: str) -> str:
    """A URL as logs may show it: scheme, host and port only. A mirror's user, password, or a token in its path
    or query never reach a log line."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return printable(f"{parts.scheme}://{host}{port}", 200)


def source_url(model: Model, mirror: str | None) -> str:
    """Where the bytes come from: the canonical URL, or the mirror with the canonical URL's path. TF Hub modules
    are asked for in the compressed format, as tensorflow_hub asks for them."""
    parts = urllib.parse.urlsplit(model.url)
    query = TFHUB_COMPRESSED_QUERY if model.hub == "tfhub" else ""
    if mirror is None:
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    base = urllib.parse.urlsplit(mirror)
    path = base.path.rstrip("/") + parts.path
    return urllib.parse.urlunsplit((base.scheme, base.netloc, path, query, ""))


def file_name(model: Model) -> str:
    """torch.hub's cache file name: the URL path's last segment, as load_state_dict_from_url takes it."""
    return os.path.basename(urllib.parse.urlsplit(model.url).path)


def module_dir_name(model: Model) -> str:
    """tensorflow_hub's cache directory name: sha1 of the handle exactly as written (compressed_module_resolver)."""
    return hashlib.sha1(model.url.encode("utf8")).hexdigest()


def image_path(model: Model) -> str:
    """Where the model is inside the image."""
    if model.hub == "torch":
        return f"{TORCH_HOME}/hub/checkpoints/{file_name(model)}"
    return f"{TFHUB_CACHE_DIR}/{module_dir_name(model)}"


def context_path(model: Model) -> str:
    """The model's layer tar in the build context; its name carries the sha256, so the content hash covers it."""
    return f"models/{model.hub}-{model.sha256}-{hashlib.sha256(model.url.encode()).hexdigest()[:12]}.tar"


def environment(models: Iterable[Model]) -> dict[str, str]:
    """The variables that point each hub's API at the baked cache."""
    hubs = {m.hub for m in models}
    env = {}
    if "torch" in hubs:
        env["TORCH_HOME"] = TORCH_HOME
    if "tfhub" in hubs:
        env["TFHUB_CACHE_DIR"] = TFHUB_CACHE_DIR
        env["TFHUB_MODEL_LOAD_FORMAT"] = "COMPRESSED"
    return env


# --------------------------------------------------------------------------------------------- fetch
def _lock(key: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(key, threading.Lock())


def _request(url: str) -> urllib.request.Request:
    """A request for `url` with any user:password moved into a header that no redirect carries on."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    request.add_header("User-Agent", "builder")
    return request


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


Opener = Callable[[urllib.request.Request], IO[bytes]]


def _open(request: urllib.request.Request) -> IO[bytes]:
    response: IO[bytes] = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    return response


def fetch(model: Model, cache_dir: Path, mirror: str | None = None, *, max_bytes: int = MAX_BYTES,
          opener: Opener = _open) -> Fetched:
    """The model's verified file in `cache_dir`, downloading it only when the cache has no good copy.

    The download streams into a temporary file beside the cache entry, hashing as it goes, and is renamed into
    place only once its sha256 is the pin: an interrupted or wrong download leaves nothing behind.
    Raises ModelError naming the model, where it came from (host only) and, for a wrong file, both digests.
    """
    folder = cache_dir / "models"
    path = folder / model.sha256
    with _lock(model.sha256):
        if path.is_file():
            seen = sha256_of(path)
            if seen == model.sha256:
                return Fetched(model=model, path=path, fetched=0)
            log.warning("model %s: the cached copy %s has sha256 %s, not its pin: fetching it again",
                        model.name, path, seen)
            path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        url = source_url(model, mirror)
        where = f"mirror {shown(url)}" if mirror else printable(url, 200)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".part-{model.sha256[:12]}-")
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                try:
                    with opener(_request(url)) as response:
                        length = getattr(response, "headers", {}).get("Content-Length")
                        if length is not None and length.isdigit() and int(length) > max_bytes:
                            raise ModelError(f"model {model.name}: {where} offers {int(length):,} bytes, more than "
                                             f"the {max_bytes:,} a model may be")
                        while chunk := response.read(CHUNK):
                            size += len(chunk)
                            if size > max_bytes:
                                raise ModelError(f"model {model.name}: {where} sent more than the {max_bytes:,} "
                                                 "bytes a model may be; refused")
                            digest.update(chunk)
                            out.write(chunk)
                        if length is not None and length.isdigit() and int(length) != size:
                            raise ModelError(f"model {model.name}: {where} sent {size:,} of {int(length):,} bytes "
                                             "(the connection broke off); run the build again")
                except urllib.error.HTTPError as exc:
                    raise ModelError(f"model {model.name}: {where} answered HTTP {exc.code} for "
                                     f"{file_name(model) or 'the model'}: check its URL"
                                     + (" and that the mirror holds it under the same path" if mirror else "")
                                     ) from None
                except (urllib.error.URLError, OSError) as exc:
                    reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
                    raise ModelError(f"model {model.name}: cannot fetch it from {where}: {printable(str(reason))}"
                                     + ("" if mirror else f"; on an air-gapped site point --model-mirror or "
                                        f"${MIRROR_ENV} at a mirror")) from None
            got = digest.hexdigest()
            if got != model.sha256:
                raise ModelError(f"model {model.name}: the file from {where} has sha256 {got}, the matrix pins "
                                 f"{model.sha256}: refused (fix the pin if the model really changed, else the "
                                 "source is wrong)")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    log.info("model %s: fetched %s bytes from %s, sha256 verified", model.name, f"{size:,}", where)
    return Fetched(model=model, path=path, fetched=size)


# ---------------------------------------------------------------------------------------------- bake
def _info(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _module_members(model: Model, blob: Path) -> list[tuple[str, bytes | None]]:
    """The files and directories of a compressed TF Hub module, relative to its root, each checked: only regular
    files and directories, nothing absolute or outside the root, within MAX_UNPACKED and MAX_MEMBERS."""
    out: list[tuple[str, bytes | None]] = []
    total = 0
    try:
        with tarfile.open(blob, mode="r:*") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise ModelError(f"model {model.name}: its archive holds more than {MAX_MEMBERS:,} entries")
                name = "" if member.name.startswith("/") else posixpath.normpath(member.name)
                if not name or name == ".." or name.startswith("../"):
                    raise ModelError(f"model {model.name}: its archive has an entry outside the module: "
                                     f"{printable(member.name)}")
                if name == ".":
                    continue
                if member.isdir():
                    out.append((name, None))
                elif member.isfile():
                    total += member.size
                    if total > MAX_UNPACKED:
                        raise ModelError(f"model {model.name}: its archive unpacks to more than "
                                         f"{MAX_UNPACKED:,} bytes")
                    fh = tar.extractfile(member)
                    out.append((name, fh.read() if fh else b""))
                else:
                    raise ModelError(f"model {model.name}: its archive has {printable(member.name)}, which is not a "
                                     "regular file or directory; a TF Hub module holds only those")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise ModelError(f"model {model.name}: not a TF Hub module in the compressed format (a .tar.gz): "
                         f"{printable(str(exc))}") from None
    return out


def layer(model: Model, blob: Path) -> bytes:
    """The model's layer as a tar rooted at /, with fixed owners, modes and times: the same model gives the same
    bytes, hence the same layer, in every image. ADD unpacks it in the Dockerfile."""
    if model.hub == "torch":
        entries: list[tuple[str, bytes | None]] = [(image_path(model).lstrip("/"), blob.read_bytes())]
    else:
        root = image_path(model).lstrip("/")
        entries = [(root, None)] + [(f"{root}/{name}", data) for name, data in _module_members(model, blob)]
        descriptor = (f"Module: {model.url}\nDownload Time: 1970-01-01 00:00:00 (baked into the image by builder, "
                      f"sha256 {model.sha256})\nDownloader Hostname: builder (PID:0)")
        entries.append((f"{root}.descriptor.txt", descriptor.encode()))
    names = {name for name, _ in entries}
    dirs = {parent for name, _ in entries for parent in _parents(name)} - names
    entries += [(d, None) for d in dirs]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(entries, key=lambda e: e[0]):
            if data is None:
                tar.addfile(_info(name, tarfile.DIRTYPE))
            else:
                tar.addfile(_info(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))
    return buf.getvalue()


def context_files(models: Iterable[Model], cache_dir: Path, mirror: str | None = None,
                  opener: Opener = _open) -> tuple[dict[str, bytes], int]:
    """The build context's model layers (context_path -> tar), fetching what the cache lacks, and the bytes
    this fetched. Raises ModelError."""
    files: dict[str, bytes] = {}
    fetched = 0
    for model in models:
        got = fetch(model, cache_dir, mirror, opener=opener)
        fetched += got.fetched
        files[context_path(model)] = layer(model, got.path)
    return files, fetched
