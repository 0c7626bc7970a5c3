"""An in-memory engine for the orchestration tests: what build, certify and bases ask of Docker, and nothing more.

It keeps images (with labels, tags and parents) and live containers, so tests can assert on what was
built, stamped, skipped or left behind. It stands in for the engine only where the point is the
orchestration; the integration tests drive the real engine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from builder.engine import MANAGED, Claim, GpuRequest, Holder, ImageInfo, RunResult, Swept, claim_name
from builder.errors import BuildFailed, EngineError, Interrupted
from builder.gpu import DriverProbe

_ids = itertools.count(1)


def new_id() -> str:
    return "sha256:" + hashlib.sha256(str(next(_ids)).encode()).hexdigest()


@dataclass
class Payload:
    """What a certify run's container does: its exit code, the result it writes (None: none) and its logs."""

    exit_code: int | None = 0
    result: dict[str, Any] | None = None
    logs: str = ""


@dataclass
class FakeEngine:
    address: str = "fake://engine"
    docker_info: dict[str, Any] = field(default_factory=lambda: {"Runtimes": {"runc": {}}})
    probe: DriverProbe | None = None  # what gpu_probe returns (None: the engine cannot serve GPU requests)
    pullable: set[str] = field(default_factory=set)
    failing_builds: dict[str, str] = field(default_factory=dict)  # tag -> error
    on_build: Callable[[str, threading.Event], None] | None = None  # runs mid-build (interrupts, waits)
    run_output: list[str] = field(default_factory=list)  # what the last step's RUN prints, then a commit
    payload: Callable[[str, list[str], GpuRequest | None], Payload] = lambda image, cmd, gpus: Payload()
    on_run: Callable[[str, threading.Event | None], None] | None = None
    images: dict[str, ImageInfo] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    containers: set[str] = field(default_factory=set)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)  # each build's tag, context files and build args
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Claims on the engine, shared by every FakeEngine given the same dict (two "processes" on one engine):
    # claim name -> who holds it. `made` keeps what each claim's build noted.
    claims: dict[str, str] = field(default_factory=dict)
    who: str = "host test, pid 1"
    made: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)
    leases_ended: int = 0
    sweeps: int = 0

    # ----------------------------------------------------------------------------------- helpers
    def add_image(self, ref: str | None = None, labels: dict[str, str] | None = None, parent: str = "",
                  size: int = 1000) -> ImageInfo:
        info = ImageInfo(id=new_id(), tags=(ref,) if ref else (), labels=dict(labels or {}), size=size, user="",
                         env=(), parent=parent, created=f"2026-11-29T00:00:{len(self.images):02d}Z")
        with self.lock:
            self.images[info.id] = info
            if ref:
                self._point(ref, info.id)
        return self.images[info.id]

    def _point(self, ref: str, image_id: str) -> None:
        old = self.refs.get(ref)
        if old and old in self.images:
            self.images[old] = replace(self.images[old], tags=tuple(t for t in self.images[old].tags if t != ref))
        self.refs[ref] = image_id
        self.images[image_id] = replace(self.images[image_id], tags=(*self.images[image_id].tags, ref))

    # ------------------------------------------------------------------------- ContainerEngine
    def image(self, ref: str) -> ImageInfo | None:
        return self.images.get(self.refs.get(ref, ref))

    def images_with_label(self, key: str, value: str | None = None, all_images: bool = False) -> list[ImageInfo]:
        return [i for i in self.images.values() if key in i.labels and (value is None or i.labels[key] == value)
                and (all_images or i.tags)]

    def pull(self, ref: str) -> None:
        self.calls.append(("pull", ref))
        if ref not in self.pullable:
            raise EngineError(f"pull access denied for {ref}")
        self.add_image(ref)

    def import_rootfs(self, stream: Any, ref: str) -> str:
        self.calls.append(("import", ref))
        return self.add_image(ref).id

    def stamp(self, image_id: str, ref: str, labels: dict[str, str]) -> str:
        self.calls.append(("stamp", ref, labels))
        parent = self.images[image_id]
        return self.add_image(ref, {**parent.labels, **labels}, parent=image_id, size=parent.size).id

    def tag(self, image_id: str, ref: str) -> None:
        self.calls.append(("tag", ref))
        with self.lock:
            self._point(ref, image_id)

    def prune_dangling(self, label: str) -> int | None:
        return 0

    def build(self, files: dict[str, bytes], *, tag: str, labels: dict[str, str], on_line: Callable[[str], None],
              stop: threading.Event, nocache: bool = False, build_args: dict[str, str] | None = None) -> str:
        self.calls.append(("build", tag))
        self.last_files = files
        self.builds.append({"tag": tag, "files": dict(files), "build_args": dict(build_args or {})})
        cid = "c0ffee" + hashlib.sha256(tag.encode()).hexdigest()[:58]
        self.containers.add(cid)  # the classic builder's step container, while the build runs
        try:
            on_line("Step 1/2 : FROM base")
            on_line(f" ---> Running in {cid}")
            stage = self.add_image(None, {MANAGED: "true"})  # the builder stage: untagged, nothing on it
            on_line(f" ---> {stage.id.removeprefix('sha256:')}")
            if self.on_build is not None:
                self.on_build(tag, stop)
            if stop.is_set():
                raise Interrupted(f"build of {tag} interrupted")
            if tag in self.failing_builds:
                on_line(f"ERROR: {self.failing_builds[tag]}")
                raise BuildFailed(self.failing_builds[tag])
            on_line("Step 2/2 : RUN pip install")
            if self.run_output:
                on_line(f" ---> Running in {cid}")
                for line in self.run_output:
                    on_line(line)
                time.sleep(0.2)  # the layer's commit: after the step's last output
                on_line(f"Removing intermediate container {cid[:12]}")
            return self.add_image(tag, labels, size=5_000_000_000).id
        finally:
            self.containers.discard(cid)

    def info(self) -> dict[str, Any]:
        return self.docker_info

    def gpu_probe(self, image_id: str, request: GpuRequest) -> DriverProbe | None:
        self.calls.append(("gpu_probe", image_id, request))
        return self.probe

    def run(self, image_id: str, command: list[str], *, labels: dict[str, str], timeout: float, mem_limit: str,
            gpus: GpuRequest | None = None, env: dict[str, str] | None = None,
            inject: dict[str, bytes] | None = None, fetch: str | None = None,
            stop: threading.Event | None = None) -> RunResult:
        cid = f"run-{len(self.runs)}"
        self.runs.append({"image": image_id, "command": command, "gpus": gpus, "inject": inject, "labels": labels})
        self.containers.add(cid)
        try:
            if self.on_run is not None:
                self.on_run(image_id, stop)
            if stop is not None and stop.is_set():
                raise Interrupted("certification interrupted")
            out = self.payload(image_id, command, gpus)
            files = {} if out.result is None else {"result.json": json.dumps(out.result).encode()}
            return RunResult(exit_code=out.exit_code, logs=out.logs, files=files, seconds=0.1)
        finally:
            self.containers.discard(cid)

    def read_file(self, image_id: str, path: str) -> bytes | None:
        if path.startswith(("/root/", "/home/")) or "/." in path:  # no credential file in any home: a clean image
            return None
        return b"torch==2.4.1\n"

    @contextmanager
    def files(self, image_id: str) -> Iterator[Callable[[str], bytes | None]]:
        yield lambda path: self.read_file(image_id, path)

    def remove_container_ids(self, ids: Iterable[str]) -> int:
        gone = self.containers & set(ids)
        self.containers -= gone
        return len(gone)

    def remove_image_ids(self, ids: Iterable[str]) -> int:
        removed = 0
        for short in list(ids):
            image_id = next((i for i in self.images if i.removeprefix("sha256:").startswith(short)), short)
            info = self.images.get(image_id)
            if info is None or info.tags or any(i.parent == image_id for i in self.images.values()):
                continue
            del self.images[image_id]
            removed += 1
        return removed

    def remove_containers(self, label: str = MANAGED, running: bool = True) -> int:
        n = len(self.containers)
        self.containers.clear()
        return n

    def claim(self, kind: str, key: str, tag: str, image_id: str) -> Claim | Holder:
        name = claim_name(kind, key)
        with self.lock:
            holder = self.claims.setdefault(name, self.who)
        self.calls.append(("claim", name))
        if holder != self.who:
            return Holder(name=name, id=name, who=holder)
        return Claim(name=name, id=name, owner=self.who, tag=tag)

    def note_made(self, claim: Claim, containers: Iterable[str], images: Iterable[str]) -> None:
        self.made[claim.name] = (set(containers), set(images))

    def release(self, claim: Claim) -> None:
        with self.lock:
            if self.claims.get(claim.name) == claim.owner:
                del self.claims[claim.name]
        self.calls.append(("release", claim.name))

    def sweep(self) -> Swept:
        self.sweeps += 1
        return Swept()

    def end_lease(self) -> None:
        self.leases_ended += 1
