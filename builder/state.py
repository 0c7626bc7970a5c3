"""The one owner of the state on disk: build records, logs, certificates, their index and publish records.

Layout under the state directory (default `.builder/`)::

    records/<tag>.json               what `build` made (image id, hash, size, time, bytes, lock)
    logs/<tag>.log, <tag>.certify.log  whole logs of a build and of a certification
    certificates/<tag>.json          the certificate (its digest is stamped on the image)
    certificates/index.json          tag -> level, digest, image, time, and where it was published
    publish/<tag>.json               the last successful push: registry digest, references, artifact

Every stage and every test reads and writes through this module, never by path. Writes are atomic,
and the index is updated under a lock that also holds across processes, so two `certify` runs (or a
`certify` and a `push`) on one state directory never lose each other's entries.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import tags

LEVELS = ("failed", "cpu-verified", "gpu-certified")  # in rising order


def safe_name(tag: str) -> str:
    """A tag as a file name: every character outside [A-Za-z0-9._-] becomes `_` (builder.tags.file_name)."""
    return tags.file_name(tag)


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def level_at_least(level: str, bar: str) -> bool:
    """Whether `level` reaches `bar` (both from LEVELS; anything else reaches nothing)."""
    if level not in LEVELS or bar not in LEVELS:
        return False
    return LEVELS.index(level) >= LEVELS.index(bar)


@dataclass(frozen=True, kw_only=True)
class Published:
    """Where a certified image was pushed: beside its certificate, never inside its digested body."""

    reference: str  # registry/repo@sha256:...
    digest: str  # the manifest digest the registry gave
    certificate_digest: str  # the certificate that was current when it was pushed
    time: str


@dataclass(frozen=True, kw_only=True)
class IndexEntry:
    """One line of certificates/index.json."""

    tag: str
    image: str
    level: str
    digest: str  # the certificate's digest
    time: str
    published: Published | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["tag"]
        if self.published is None:
            del data["published"]
        return data

    @classmethod
    def from_json(cls, tag: str, data: dict[str, Any]) -> IndexEntry:
        pub = data.get("published")
        return cls(tag=tag, image=str(data.get("image", "")), level=str(data.get("level", "")),
                   digest=str(data.get("digest", "")), time=str(data.get("time", "")),
                   published=Published(**pub) if isinstance(pub, dict) else None)


@dataclass(frozen=True, kw_only=True)
class PublishRecord:
    """What one successful push did. A failed push writes none."""

    tag: str
    registry: str
    repository: str  # registry/namespace/name, without tag or digest
    digest: str  # manifest digest in the registry
    reference: str  # repository@digest: what `resolve` prints and `pull` pulls
    tags: tuple[str, ...]  # every tag pushed for it (the cell's, the immutable one, aliases)
    certificate_digest: str
    certificate_artifact: str | None  # the tag (or digest) the certificate was pushed under
    image_id: str  # the local stamped image that was pushed
    noop: bool  # the registry already had this manifest
    seconds: float
    time: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishRecord:
        return cls(**{**data, "tags": tuple(data.get("tags") or ())})


@dataclass(frozen=True)
class State:
    """The state directory of one checkout (or one CI job)."""

    root: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    # ------------------------------------------------------------------------------------ paths
    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    @property
    def certificates_dir(self) -> Path:
        return self.root / "certificates"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def publish_dir(self) -> Path:
        return self.root / "publish"

    @property
    def index_path(self) -> Path:
        return self.certificates_dir / "index.json"

    def record_path(self, tag: str) -> Path:
        return self.records_dir / f"{safe_name(tag)}.json"

    def certificate_path(self, tag: str) -> Path:
        return self.certificates_dir / f"{safe_name(tag)}.json"

    def publish_path(self, tag: str) -> Path:
        return self.publish_dir / f"{safe_name(tag)}.json"

    def log_path(self, tag: str, stage: str = "build") -> Path:
        """The whole log of one cell's stage (build, certify, ...); its folder exists on return."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if stage == "build" else f".{stage}"
        return self.logs_dir / f"{safe_name(tag)}{suffix}.log"

    # ---------------------------------------------------------------------------------- records
    def write_record(self, tag: str, record: dict[str, Any]) -> Path:
        path = self.record_path(tag)
        write_json(path, record)
        return path

    def read_record(self, tag: str) -> dict[str, Any] | None:
        data = _read_json(self.record_path(tag))
        return data if isinstance(data, dict) else None

    def records(self) -> list[dict[str, Any]]:
        """Every build record, in tag order."""
        found = [_read_json(p) for p in sorted(self.records_dir.glob("*.json"))]
        return sorted((r for r in found if isinstance(r, dict)), key=lambda r: str(r.get("tag", "")))

    # ----------------------------------------------------------------------------- certificates
    def write_certificate(self, tag: str, certificate: dict[str, Any]) -> Path:
        """Write the certificate atomically (the index is updated by `index_certificate`, once stamped)."""
        path = self.certificate_path(tag)
        write_json(path, certificate)
        return path

    def index_certificate(self, tag: str, certificate: dict[str, Any]) -> IndexEntry:
        """Make `certificate` the index's entry for `tag`.

        This drops the old entry's `published`: that push carried the old certificate's digest.
        """
        entry = IndexEntry(tag=tag, image=str(certificate["image"]["id"]), level=str(certificate["level"]),
                           digest=str(certificate["digest"]), time=str(certificate["time"]))
        with self.index_lock() as index:
            index[tag] = entry.to_json()
        return entry

    def read_certificate(self, tag: str) -> dict[str, Any] | None:
        data = _read_json(self.certificate_path(tag))
        return data if isinstance(data, dict) else None

    @contextmanager
    def index_lock(self) -> Iterator[dict[str, Any]]:
        """The index as a dict, to change in place; written back atomically on leaving.

        Held under a thread lock and an flock on certificates/.index.lock, so concurrent writers in
        this process and in others each see the others' entries.
        """
        self.certificates_dir.mkdir(parents=True, exist_ok=True)
        with self._lock, (self.certificates_dir / ".index.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                data = _read_json(self.index_path)
                index: dict[str, Any] = data if isinstance(data, dict) else {}
                yield index
                write_json(self.index_path, index)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def index(self) -> dict[str, IndexEntry]:
        data = _read_json(self.index_path)
        if not isinstance(data, dict):
            return {}
        return {tag: IndexEntry.from_json(tag, v) for tag, v in data.items() if isinstance(v, dict)}

    def certified(self, bar: str = "cpu-verified") -> list[IndexEntry]:
        """The index entries whose level reaches `bar`, in tag order."""
        return [e for _, e in sorted(self.index().items()) if level_at_least(e.level, bar)]

    # ---------------------------------------------------------------------------------- publish
    def write_publish(self, record: PublishRecord) -> Path:
        """Record a successful push: the publish record, and `published` on the index entry.

        The index entry is only marked if it still names the pushed certificate: a re-certification
        that raced the push has made that push stale.
        """
        path = self.publish_path(record.tag)
        write_json(path, record.to_json())
        with self.index_lock() as index:
            entry = index.get(record.tag)
            if isinstance(entry, dict) and entry.get("digest") == record.certificate_digest:
                entry["published"] = asdict(Published(reference=record.reference, digest=record.digest,
                                                       certificate_digest=record.certificate_digest,
                                                       time=record.time))
        return path

    def read_publish(self, tag: str) -> PublishRecord | None:
        data = _read_json(self.publish_path(tag))
        return PublishRecord.from_json(data) if isinstance(data, dict) else None
