"""Build cells into images: skip what is up to date, build the rest in a bounded pool, and summarise.

Each cell's whole log goes to a file; a record of every built image (id, hash, size, time, bytes
fetched, the locked package set) goes beside it. Ctrl-C stops the builds in flight and removes their
containers; finished images and their records stay.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from builder import __version__, models
from builder.bases import ensure_base
from builder.engine import NO_SPACE, Claim, ContainerEngine, ImageInfo, full, holding, tidy
from builder.errors import BuilderError, BuildFailed, EngineError, EngineGone, Interrupted
from builder.labels import HASH, build_labels
from builder.matrix.model import Cell
from builder.pool import run_pool
from builder.render import ROOT, BuildContext, render
from builder.sources import APT_SOURCES, LOOPBACK, PackageProxy, Sources, apt_hosts, listen_address, serve
from builder.state import State

log = logging.getLogger("builder")

STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
# The classic builder names each step's container and each image it commits: a build's own, nobody else's.
RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")
COMMITTED = re.compile(r"^ ---> ([0-9a-f]{12,64})\s*$")
# The classic builder's own lines, as against what a step's command prints.
BUILDER_LINE = re.compile(r"^( ---> |Removing intermediate container |Successfully (built|tagged) )")
PLAIN_EVERY_S = 30.0
LOG_TAIL = 15


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    state_dir: Path
    sources: Sources
    jobs: int = 1
    force: bool = False
    fail_fast: bool = False
    keep_cache: bool = False
    no_layer_cache: bool = False  # --no-cache: the engine reuses no layer (a cold build)
    model_mirror: str | None = None  # --model-mirror: where models are fetched from (never in an image or log)


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    cell: Cell
    status: str  # built, up to date, failed, skipped, interrupted
    seconds: float = 0.0
    image_id: str | None = None
    size: int = 0
    upstream_bytes: int = 0
    cached_bytes: int = 0
    log_path: Path | None = None
    error: str | None = None
    log_tail: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.status in ("built", "up to date")


def revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def find_built(engine: ContainerEngine, content_hash: str) -> ImageInfo | None:
    """An image already built from exactly this content, if the engine has one."""
    found = engine.images_with_label(HASH, content_hash)
    return found[0] if found else None


class Progress:
    """Live per-cell progress: a rich display on a terminal, plain lines elsewhere (CI)."""

    def __init__(self, cells: list[Cell]) -> None:
        self.live = sys.stderr.isatty() and os.environ.get("CI") is None
        self._rich: Any = None
        self._tasks: dict[str, Any] = {}
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.fields[cell]}"), BarColumn(), TextColumn("{task.description}"),
                                  TextColumn("{task.fields[packages]}"), TimeElapsedColumn(), transient=False)

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def step(self, cell: Cell, n: int, total: int, text: str) -> None:
        if self._rich is not None:
            task = self._tasks.get(cell.tag)
            if task is None:
                task = self._tasks[cell.tag] = self._rich.add_task(text, total=total, cell=cell.tag, packages="")
            self._rich.update(task, completed=n, total=total, description=f"{n}/{total} {text[:60]}")
        else:
            log.info("%s: step %d/%d: %s", cell.tag, n, total, text[:100])

    def packages(self, cell: Cell, fetched: int, cached: int, rate: float, elapsed: float) -> None:
        """What the package proxy has served this cell so far: the long pip step is not silent."""
        text = (f"packages: {fetched / 1e6:,.0f} MB fetched, {cached / 1e6:,.0f} MB from cache, "
                f"{rate / 1e6:.1f} MB/s, {elapsed:.0f} s")
        task = self._tasks.get(cell.tag)
        if self._rich is not None and task is not None:
            self._rich.update(task, packages=text)
        elif self._rich is None:
            log.info("%s: %s", cell.tag, text)

    @property
    def every(self) -> float:
        """Seconds between package reports: live on a terminal, a line every half minute in a log."""
        return 1.0 if self._rich is not None else PLAIN_EVERY_S

    def done(self, result: BuildResult) -> None:
        msg = f"{result.cell.tag}: {result.status} in {result.seconds:.0f} s"
        if result.error:
            msg += f": {result.error}"
        if self._rich is not None:
            self._rich.console.print(msg)
        else:
            log.info("%s", msg)


def _proxy_key(cell: Cell, context: BuildContext) -> str:
    """What the proxy's port is derived from: what the builder stage installs, and where, not the whole cell.

    A cell that differs only after the builder stage (its models, its repository) then gets the same port, the
    same pip.conf and the cached builder stage.
    """
    return "|".join([cell.base.name, cell.python, cell.index or "", context.files["requirements.txt"].decode()])


def _apt_mirrors(engine: ContainerEngine, base_id: str, cell: Cell) -> frozenset[str]:
    """The mirrors the base's apt reads (its sources files, and the mirror it was bootstrapped from)."""
    texts = [(engine.read_file(base_id, path) or b"").decode("utf-8", "replace") for path in APT_SOURCES]
    if cell.base.bootstrap is not None:
        texts.append(f"deb {cell.base.bootstrap.mirror.rstrip('/')}/ {cell.base.bootstrap.suite} main")
    return apt_hosts(texts)


@dataclass
class Made:
    """What this run's builds made on the engine, from their own logs: the step containers and images.

    Clean-up and pruning touch these and nothing else, so another builder on the same engine (another
    process, another user) keeps its containers and its intermediate images.
    """

    containers: set[str] = field(default_factory=set)
    images: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def see(self, line: str) -> bool:
        """Take note of a step container or image the line names; whether it was new."""
        if match := RUNNING_IN.match(line):
            with self.lock:
                new = match[1] not in self.containers
                self.containers.add(match[1])
                return new
        elif match := COMMITTED.match(line):
            with self.lock:
                new = match[1] not in self.images
                self.images.add(match[1])
                return new
        return False


def _build_one(
    engine: ContainerEngine, cell: Cell, options: BuildOptions, progress: Progress, stop: threading.Event,
    base_lock: threading.Lock, listen: str, made: Made,
) -> BuildResult:
    started = time.monotonic()
    state = State(options.state_dir)
    log_path = state.log_path(cell.tag)
    # The hash covers the base image the engine holds, not its tag: a base that moved is a change.
    base = engine.image(cell.base.image)
    if not options.force and base is not None:
        existing = find_built(engine, render(cell, base_id=base.id).content_hash)
        if existing is not None:
            if cell.tag not in existing.tags:
                engine.tag(existing.id, cell.tag)
            return BuildResult(cell=cell, status="up to date", seconds=time.monotonic() - started,
                               image_id=existing.id, size=existing.size, log_path=log_path)
    with base_lock:  # two cells on one base must not bootstrap it twice
        base_id, _ = ensure_base(engine, cell.base)
    context = render(cell, base_id=base_id)
    before = {i.id for i in engine.images_with_label(HASH, context.content_hash)}
    # One build of this content at a time on the engine, whichever process or host asks: the other waits, then
    # takes what the first made (even with --force: it is brand new) instead of building it again.
    with holding(engine, "build", context.content_hash, cell.tag, base_id, stop) as (claim, waited):
        if waited:
            after = engine.images_with_label(HASH, context.content_hash)
            fresh = [i for i in after if i.id not in before]
            existing = fresh[0] if fresh else after[0] if after and not options.force else None
            if existing is not None:
                if cell.tag not in existing.tags:
                    engine.tag(existing.id, cell.tag)
                log.info("%s: built by another run meanwhile: not building it again", cell.tag)
                return BuildResult(cell=cell, status="up to date", seconds=time.monotonic() - started,
                                   image_id=existing.id, size=existing.size, log_path=log_path)
        return _build_claimed(engine, cell, options, progress, stop, listen, made, context, base_id, claim, started)


def _last_projects(state: State, cell: Cell) -> list[str]:
    """The projects of the cell's last lock and its installer: the index pages its build will ask for."""
    record = state.read_record(cell.tag) or {}
    lock = record.get("lock") if isinstance(record.get("lock"), list) else []
    if not lock:
        return []
    return [str(pin).split("==", 1)[0] for pin in lock] + ([cell.installer.split("==", 1)[0]] if cell.installer else [])


def _build_claimed(
    engine: ContainerEngine, cell: Cell, options: BuildOptions, progress: Progress, stop: threading.Event,
    listen: str, made: Made, context: BuildContext, base_id: str, claim: Claim, started: float,
) -> BuildResult:
    state = State(options.state_dir)
    log_path = state.log_path(cell.tag)
    # A remote engine may have no route out: its apt reaches the base's mirrors through our proxy too.
    # A direct build sends everything through the proxy's http_proxy route, apt included: apt may pass to them.
    direct = options.sources.proxy and context.direct is not None
    routed = options.sources.proxy and (listen != LOOPBACK or direct)
    apt = _apt_mirrors(engine, base_id, cell) if routed else frozenset()
    # The cell's models, each fetched once into the host cache (shared by every cell) and verified first.
    model_files, model_bytes = models.context_files(context.models.values(), options.sources.cache_dir,
                                                    options.model_mirror)
    tail: list[str] = []
    mine = Made()  # this cell's own, kept in its claim: the sweep's list, should this run or the engine die
    # [n, instruction, seconds, seconds after the step's last output line]: where a build's time goes, kept in
    # its record. After a RUN's last output, the classic builder is mostly committing its layer.
    clock = StepClock()
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = build_labels(content_hash=context.content_hash, tag=cell.tag, created=created, revision=revision(),
                          version=__version__)
    with (log_path.open("w", encoding="utf-8") as logfile,
          serve(options.sources, cell.index, host=listen, apt=apt, key=_proxy_key(cell, context),
                prefetch=_last_projects(state, cell)) as (src, proxy)):

        def on_line(line: str) -> None:
            logfile.write(line + "\n")
            logfile.flush()
            tail.append(line)
            del tail[:-LOG_TAIL]
            made.see(line)
            if mine.see(line):
                engine.note_made(claim, mine.containers, mine.images)
            match = clock.see(line)
            if match:
                progress.step(cell, int(match[1]), int(match[2]), match[3])

        try:
            with watch_packages(progress, cell, proxy):
                image_id = engine.build(
                    {**context.build_files(proxy is not None), **model_files, **src}, tag=cell.tag, labels=labels,
                    on_line=on_line, stop=stop, build_args=proxy.build_args(direct=direct) if proxy else None,
                    nocache=options.no_layer_cache)
        except BuildFailed as exc:
            message = str(exc)
            if NO_SPACE in "\n".join([message, *tail]).lower():
                raise BuildFailed(full(engine.address, _data_root(engine), "the build"), tail, str(log_path)) from None
            if proxy is not None and proxy.errors:  # the upstream's own words, not just pip's
                more = f" (and {len(proxy.errors) - 1} more)" if len(proxy.errors) > 1 else ""
                message += f"; the package proxy's upstream failed: {proxy.errors[-1][:300]}{more}"
            raise BuildFailed(message, tail, str(log_path)) from None
        steps = clock.close()
        upstream = proxy.upstream_bytes if proxy else 0
        cached = proxy.cached_bytes if proxy else 0
        fetched_files = dict(proxy.fetched) if proxy else {}
    info = engine.image(image_id)
    seconds = time.monotonic() - started
    lock = engine.read_file(image_id, "/opt/venv/requirements.lock") or b""
    record: dict[str, Any] = {
        "tag": cell.tag, "image_id": image_id, "content_hash": context.content_hash, "created": created,
        "seconds": round(seconds, 1), "size": info.size if info else 0, "upstream_bytes": upstream,
        "cached_bytes": cached, "fetched_files": fetched_files, "steps": steps, "lock": lock.decode().split(),
        "cell": cell.claims(), "model_bytes": model_bytes,
        "tool": __version__,
    }
    state.write_record(cell.tag, record)
    return BuildResult(cell=cell, status="built", seconds=seconds, image_id=image_id, size=int(record["size"]),
                       upstream_bytes=upstream, cached_bytes=cached, log_path=log_path)


class StepClock:
    """A classic build's steps timed from its output lines as they arrive: [n, the instruction's first 80
    characters, seconds, seconds after the step's last output line (None: it printed nothing)]. The bench times
    the naive recipe's build with it too."""

    def __init__(self) -> None:
        self.steps: list[list[Any]] = []
        self._open = False  # the last step still holds its start and last-output clock readings

    def see(self, line: str) -> re.Match[str] | None:
        """Note a line; returns the step line's match when it starts a step."""
        now = time.monotonic()
        match = STEP.match(line)
        if match:
            self._close(now)
            self.steps.append([int(match[1]), match[3][:80], now, None])
            self._open = True
        elif self._open and line.strip() and not BUILDER_LINE.match(line):
            self.steps[-1][3] = now
        return match

    def close(self) -> list[list[Any]]:
        """The steps, the last one ended now."""
        self._close(time.monotonic())
        return self.steps

    def _close(self, now: float) -> None:
        if self._open:
            step = self.steps[-1]
            step[2], step[3] = round(now - step[2], 2), None if step[3] is None else round(now - step[3], 2)
            self._open = False


def _data_root(engine: ContainerEngine) -> str | None:
    """Where the engine keeps its images (`docker info`'s DockerRootDir), to name in a disk-full error."""
    try:
        return str(engine.info().get("DockerRootDir") or "") or None
    except EngineError:
        return None


@contextmanager
def watch_packages(progress: Progress, cell: Cell, proxy: PackageProxy | None) -> Iterator[None]:
    """While a build runs, report the proxy's bytes every `progress.every` seconds, when they have moved."""
    if proxy is None:
        yield
        return
    finished = threading.Event()

    def report() -> None:
        last, last_at = (0, 0), time.monotonic()
        while not finished.wait(progress.every):
            now, at = (proxy.upstream_bytes, proxy.cached_bytes), time.monotonic()
            if now != last:
                rate = (sum(now) - sum(last)) / max(at - last_at, 1e-3)
                progress.packages(cell, now[0], now[1], rate, at - proxy.started)
            last, last_at = now, at

    thread = threading.Thread(target=report, daemon=True, name=f"packages {cell.tag}")
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join(timeout=5)


def build_cells(engine: ContainerEngine, cells: list[Cell], options: BuildOptions) -> list[BuildResult]:
    base_lock = threading.Lock()
    made = Made()
    gone = threading.Event()
    tidy(engine)  # what a run that died left here (its claims, containers, builder stages) goes first
    # Builds run on the engine host's network: the proxy listens where that host reaches this machine.
    listen = listen_address(engine.address) if options.sources.proxy else LOOPBACK
    if listen != LOOPBACK:
        log.info("engine at %s: package proxy on %s", engine.address, listen)

    def work(cell: Cell, stop: threading.Event) -> BuildResult:
        started = time.monotonic()
        if gone.is_set():  # the engine died under an earlier build: one line said so, not one per cell
            return BuildResult(cell=cell, status="skipped")
        try:
            return _build_one(engine, cell, options, progress, stop, base_lock, listen, made)
        except EngineGone as exc:
            gone.set()
            return BuildResult(cell=cell, status="failed", seconds=time.monotonic() - started, error=str(exc),
                               log_path=State(options.state_dir).log_path(cell.tag))
        except BuildFailed as exc:
            return BuildResult(cell=cell, status="failed", seconds=time.monotonic() - started, error=str(exc),
                               log_tail=tuple(exc.log_tail), log_path=Path(exc.log_path) if exc.log_path else None)
        except Interrupted:
            return BuildResult(cell=cell, status="interrupted", seconds=time.monotonic() - started)
        except BuilderError as exc:
            return BuildResult(cell=cell, status="failed", seconds=time.monotonic() - started, error=str(exc))

    with Progress(cells) as progress:
        try:
            results = run_pool(cells, options.jobs, work, progress.done,
                               lambda cell, status: BuildResult(cell=cell, status=status),
                               lambda: engine.remove_container_ids(made.containers), options.fail_fast)
        finally:
            if not options.keep_cache and not gone.is_set():
                prune_builder_stages(engine, made)
            engine.end_lease()
    return results


def prune_builder_stages(engine: ContainerEngine, made: Made) -> None:
    """Drop this run's builder-stage images (as large as the final image) once no build needs them.

    Only the images this run's builds committed are candidates, and the engine keeps every one that a
    tagged image builds on; a global prune would also take the newest layer of a build still under way.
    """
    try:
        removed = engine.remove_image_ids(sorted(made.images))
        if removed:
            log.info("removed %d builder-stage image(s)", removed)
    except BuilderError as exc:  # pruning is housekeeping: never fail a run for it
        log.warning("could not remove builder-stage images: %s", exc)
