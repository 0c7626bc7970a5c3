"""Certify built images: run the smoke payload in a fresh container of each, decide a level, record it.

The certificate (JSON, one per image) is the proof; its level and digest are also stamped on the
image as labels, in a thin layer committed on top of the tested image, so `docker image inspect`
shows them wherever the image goes. The payload is copied into the container at run time, not built
into the image: a new check changes no image's hash, and the certificate records which payload ran.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import platform
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from builder import __version__, sbom
from builder.engine import ContainerEngine, GpuRequest, holding, tidy
from builder.errors import BuilderError, EngineGone, Interrupted
from builder.gpu import DriverProbe, gpu_paths
from builder.labels import CERT_DIGEST, HASH, LEVEL, SESSION
from builder.matrix.model import Cell
from builder.pool import run_pool
from builder.render import SMOKE, render
from builder.state import LEVELS, State
from builder.verdict import decide, summarize

log = logging.getLogger("builder")
# The payload's promises, for the one check certify makes from outside the image. Imported by name: the payload's
# modules are standard library for any Python from 3.8 on, untyped, and outside mypy's strict check.
promises: Any = importlib.import_module("builder.smoke.promises")

CERT_SCHEMA = 2
PAYLOAD_DIR = "/opt/builder/smoke"
RESULT_PATH = "/tmp/builder-smoke/result.json"
@dataclass(frozen=True, kw_only=True)
class CertifyOptions:
    state_dir: Path
    gpus: str = "auto"  # auto, all, none, or a count
    require_gpu: bool = False
    timeout: float = 900.0
    memory: str = "8g"
    jobs: int = 1
    force: bool = False  # re-run even where the certificate is current
    lock_dir: Path = Path(tempfile.gettempdir())  # where the per-engine GPU lock lives
    image: str | None = None  # certify this image as it is (a pulled one: `pull --recertify`), not the cell's build


@dataclass(frozen=True, kw_only=True)
class GpuPlan:
    """What one certify run asks of the engine's GPUs, and why."""

    request: GpuRequest | None  # what each container gets
    probe: DriverProbe | None  # the engine host's driver and GPUs, where a probe ran
    paths: frozenset[str]  # how the engine hands out GPUs: runtime, hook, cdi
    note: str | None = None  # why no GPU is asked for, where one might have been
    error: str | None = None  # GPUs were asked for and the engine cannot serve them

    @property
    def requested(self) -> bool:
        return self.request is not None


def driver_shortfall(cell: Cell, driver: str | None) -> tuple[bool, str | None]:
    """(usable, note): can a GPU run this cell on `driver`, and what a person should know about it."""
    if cell.cuda is None or driver is None or cell.driver_floor is None:
        return True, None
    try:
        have = Version(driver)
        floor, ga = Version(cell.driver_floor), Version(cell.driver_ga or cell.driver_floor)
    except InvalidVersion:
        return True, f"cannot compare driver {driver!r} with the cell's minimum {cell.driver_floor}"
    if have < floor:
        return False, (f"host driver {driver} is older than {cell.driver_floor}, the oldest that runs CUDA "
                       f"{cell.cuda} (GA driver {cell.driver_ga}): upgrade the driver")
    if have < ga:
        return True, (f"host driver {driver} runs CUDA {cell.cuda} through minor-version compatibility; "
                      f"features that JIT-compile PTX need {cell.driver_ga} or newer")
    return True, None


def plan_gpus(option: str, paths: set[str], probe: DriverProbe | None, address: str) -> GpuPlan:
    """Decide the GPU request from --gpus, the engine's ways to hand out GPUs, and its host's probe.

    `probe` is None where the engine refused a GPU request outright (no runtime, hook or CDI).
    `all` or a count asks for GPUs whatever the probe saw; a run that then sees none fails. `auto`
    asks only where the engine can hand GPUs out and its host's driver lists at least one: a host
    with the NVIDIA toolkit and no GPU is not asking for one.
    """
    ways = frozenset(paths | ({"hook"} if probe is not None and "runtime" not in paths and "cdi" not in paths
                              else set()))
    if option == "none":
        return GpuPlan(request=None, probe=probe, paths=ways)
    cdi = ways == {"cdi"}
    if option != "auto":
        if not ways:
            return GpuPlan(request=None, probe=probe, paths=ways, error=(
                f"--gpus {option}: the engine at {address} cannot hand out GPUs (no NVIDIA runtime, hook or CDI "
                "device): install the NVIDIA Container Toolkit and restart the engine, or use --gpus none"))
        return GpuPlan(request=GpuRequest(count=-1 if option == "all" else int(option), cdi=cdi), probe=probe,
                       paths=ways)
    if not ways:
        return GpuPlan(request=None, probe=probe, paths=ways,
                       note=f"the engine at {address} has no NVIDIA runtime, hook or CDI device: CPU only")
    if probe is None or not probe.gpus:
        why = probe.error if probe is not None and probe.error else "no GPU listed"
        return GpuPlan(request=None, probe=probe, paths=ways,
                       note=f"the engine at {address} can hand out GPUs ({', '.join(sorted(ways))}) but its host "
                            f"shows none ({why}): CPU only")
    return GpuPlan(request=GpuRequest(count=-1, cdi=cdi), probe=probe, paths=ways)


def digest(certificate: dict[str, Any]) -> str:
    body = {k: v for k, v in certificate.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def payload_files() -> dict[str, bytes]:
    """The smoke payload as it goes into each container: every file beside payload.py, by its path there."""
    return {f"{PAYLOAD_DIR}/{p.name}": p.read_bytes() for p in sorted(SMOKE.iterdir())
            if p.is_file() and p.suffix in (".py", ".json")}


def payload_digest(files: dict[str, bytes]) -> str:
    """One digest for the payload that ran: recorded in the certificate, compared to find stale ones."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).hexdigest().encode() + b"\0")
    return "sha256:" + h.hexdigest()


def find_tested_image(engine: ContainerEngine, tag: str, content_hash: str) -> str | None:
    """The image built from this content: the build itself, never a certificate layer stamped on it.

    The classic builder's intermediate images carry the build's labels too, so candidates are narrowed
    to the tagged image (or its parent, once stamped), else to the newest image no other one builds on.
    """
    tagged = engine.image(tag)
    if tagged is not None and tagged.labels.get(HASH) == content_hash:
        return tagged.parent if LEVEL in tagged.labels and tagged.parent else tagged.id
    found = engine.images_with_label(HASH, content_hash, all_images=True)
    parents = {i.parent for i in found}
    leaves = sorted((i for i in found if i.id not in parents and LEVEL not in i.labels), key=lambda i: i.created)
    return leaves[-1].id if leaves else None


def current_hash(engine: ContainerEngine, cell: Cell) -> str:
    """The cell's content hash against the base the engine holds now (see render.render)."""
    base = engine.image(cell.base.image)
    return render(cell, base_id=base.id if base is not None else None).content_hash


@dataclass(frozen=True, kw_only=True)
class CertifyResult:
    cell: Cell
    level: str  # one of LEVELS, or "not built", "skipped", "interrupted"
    seconds: float = 0.0
    summary: str = ""
    certificate: Path | None = None
    gpu_required: bool = False
    current: bool = False  # an existing certificate was still current: nothing ran

    @property
    def ok(self) -> bool:
        return self.level == "gpu-certified" if self.gpu_required else self.level in LEVELS[1:]


def staleness(cert: dict[str, Any] | None, image_id: str, stamped: str | None, payload: str,
              plan: GpuPlan) -> str | None:
    """Why an existing certificate no longer stands for this image and payload; None when it is current."""
    if cert is None:
        return "no certificate"
    if (cert.get("image") or {}).get("id") != image_id:
        return "certified another build of this cell"
    if (cert.get("payload") or {}).get("digest") != payload:
        return f"certified by an older payload ({(cert.get('payload') or {}).get('digest', 'unrecorded')[:19]})"
    if stamped != cert.get("digest"):
        return "the image's stamp does not carry this certificate's digest"
    if plan.requested != bool((cert.get("host") or {}).get("gpus_requested")):
        return "GPUs are requested now and were not then" if plan.requested else "certified with GPUs; none now"
    return None


@contextmanager
def gpu_lease(lock_dir: Path, address: str, plan: GpuPlan) -> Iterator[None]:
    """Hold the engine's GPUs for one run: concurrent certify runs (threads or processes) never share them.

    A run without GPUs takes no lock. One that has to wait says so, rather than measuring a GPU that
    another run is loading.
    """
    if not plan.requested:
        yield
        return
    path = lock_dir / f"builder-gpus-{hashlib.sha256(address.encode()).hexdigest()[:16]}.lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the GPUs of %s: another certify run holds them (%s)", address, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def expected_gpus(plan: GpuPlan) -> int | None:
    """How many GPUs the container should see: the count asked for, or all that the host's probe listed."""
    if plan.request is None:
        return None
    if plan.request.count > 0:
        return plan.request.count
    return len(plan.probe.gpus) if plan.probe is not None and plan.probe.gpus else None


def model_summary(cell: Cell, checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each baked model as certify found it: its pin, whether it loaded offline, and how long that took. A model
    whose check is missing (the payload died first) is `not run`, never passed."""
    found = {c.get("name"): c for c in checks if isinstance(c, dict)}
    out = []
    for model in cell.models:
        check = found.get(f"model.{model.name}") or {}
        values = check.get("values") or {}
        out.append({"name": model.name, "hub": model.hub, "url": model.url, "sha256": model.sha256,
                    "status": check.get("status", "not run"), "load_seconds": values.get("load_seconds")})
    return out


def certify_one(engine: ContainerEngine, cell: Cell, options: CertifyOptions, session: str,
                stop: threading.Event, plan: GpuPlan) -> tuple[str, dict[str, Any] | None, str]:
    """Certify one cell under its engine-wide claim; returns (level, certificate or None, one-line summary).

    Two runs (processes, or hosts sharing the engine) never certify the same image at once: the second waits,
    then takes the certificate the first wrote, if it is current, instead of running again (even with --force).
    """
    if options.image is not None:
        pulled = engine.image(options.image)
        image_id, key = (pulled.id, pulled.labels.get(HASH) or pulled.id) if pulled else (None, "")
    else:
        key = current_hash(engine, cell)
        image_id = find_tested_image(engine, cell.tag, key)
    if image_id is None or plan.error:  # nothing will run: no claim needed
        return _certify_claimed(engine, cell, options, session, stop, plan)
    before = (State(options.state_dir).read_certificate(cell.tag) or {}).get("digest")
    with holding(engine, "certify", key, cell.tag, image_id, stop) as (_, waited):
        return _certify_claimed(engine, cell, options, session, stop, plan, waited=waited, before=before)


def _certify_claimed(engine: ContainerEngine, cell: Cell, options: CertifyOptions, session: str,
                     stop: threading.Event, plan: GpuPlan, waited: bool = False,
                     before: str | None = None) -> tuple[str, dict[str, Any] | None, str]:
    """certify_one's work; after a wait for another run, `before` is the certificate's digest from before it."""
    state = State(options.state_dir)
    if options.image is not None:  # a pulled image has no parent and may come from another base: take it as it is
        pulled = engine.image(options.image)
        image_id, content_hash = (pulled.id, pulled.labels.get(HASH, "")) if pulled else (None, "")
    else:
        content_hash = current_hash(engine, cell)
        image_id = find_tested_image(engine, cell.tag, content_hash)
    if image_id is None:
        return "not built", None, ("no image from the current matrix, templates and base: "
                                    "run `python -m builder build` first")
    if plan.error:
        return "failed", None, plan.error
    files = payload_files()
    payload = payload_digest(files)
    old = state.read_certificate(cell.tag)
    tagged = engine.image(cell.tag)
    stale = staleness(old, image_id, tagged.labels.get(CERT_DIGEST) if tagged else None, payload, plan)
    if stale is None and old is not None and waited and old.get("digest") != before:
        return str(old["level"]), old, f"current: {summarize(old.get('checks') or [])} (certified by another run)"
    if stale is None and old is not None and not options.force:
        return str(old["level"]), old, f"current: {summarize(old.get('checks') or [])} (--force re-runs it)"
    if old is not None and stale is not None:
        log.info("%s: re-certifying: %s", cell.tag, stale)
    request = plan.request
    driver = plan.probe.version if plan.probe else None
    usable, driver_note = driver_shortfall(cell, driver)
    if request is not None and not usable:
        return "failed", None, f"GPUs were requested, but {driver_note}"
    mode = "require" if request is not None else "off"
    command = ["python", f"{PAYLOAD_DIR}/payload.py", "--claims", "/opt/builder/cell.json", "--out", RESULT_PATH,
               "--promises", "--gpu", mode]
    expect = expected_gpus(plan)
    if expect:  # gpu.visible compares the framework's count with what was asked for
        command += ["--expect-gpus", str(expect)]
    image_user = info.user if (info := engine.image(image_id)) is not None else ""  # promise.non_root checks it
    started = datetime.now(timezone.utc)
    with gpu_lease(options.lock_dir, engine.address, plan):
        run = engine.run(image_id, command, labels={SESSION: session}, timeout=options.timeout,
                         mem_limit=options.memory, gpus=request, inject=files, fetch=RESULT_PATH, stop=stop,
                         env={"BUILDER_IMAGE_USER": image_user})
    log_path = state.log_path(cell.tag, "certify")
    log_path.write_text(run.logs, encoding="utf-8")
    raw = next(iter(run.files.values()), None)
    try:
        result = json.loads(raw) if raw else None
    except ValueError:  # a payload killed mid-write leaves half a file: no result, and the level says so
        result = None
    if result is not None and not isinstance(result, dict):
        result = None
    if result is not None:  # what the image's user cannot see from inside (/root) is read through the engine
        result["checks"] = [*(result.get("checks") or []), credentials_everywhere(engine, image_id)]
    outcome = decide(result, run.exit_code, requested=request is not None, require_gpu=options.require_gpu,
                     logs=run.logs)
    for check in (result or {}).get("checks") or []:  # the summary gives a skip's reason short: whole with --debug
        if isinstance(check, dict) and check.get("status") == "skip":
            log.debug("%s: %s skipped: %s", cell.tag, check.get("name"), check.get("detail"))
    inventory = (result or {}).get("inventory", {})
    certificate: dict[str, Any] = {
        "schema": CERT_SCHEMA,
        "tool": {"name": "builder", "version": __version__},
        "payload": {"digest": payload, "files": sorted(files)},
        "time": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image": {"id": image_id, "tag": cell.tag, "content_hash": content_hash},
        "cell": cell.claims(),
        "host": {"name": platform.node(), "engine": engine.address,
                 "driver": driver, "driver_probe": plan.probe.summary if plan.probe else None,
                 "gpu_paths": sorted(plan.paths), "gpus_requested": request.count if request else None,
                 "gpus": inventory.get("gpus", []), "driver_in_container": inventory.get("driver")},
        "level": outcome.level,
        "reasons": outcome.reasons,
        "notes": [n for n in (plan.note, driver_note, outcome.gpu_note) if n],
        "checks": (result or {}).get("checks", []),
        "inventory": inventory,
        "run": {"exit_code": run.exit_code, "seconds": round(run.seconds, 1), "log": str(log_path)},
        "models": model_summary(cell, (result or {}).get("checks", [])),
    }
    with engine.files(image_id) as read:  # one container for every file the SBOM reads
        certificate["sbom"] = sbom.write(read, cell, image_id, started,
                                         state.certificate_path(cell.tag))  # beside the certificate, its sha256 here
    certificate["digest"] = digest(certificate)
    path = state.write_certificate(cell.tag, certificate)
    engine.stamp(image_id, cell.tag, {LEVEL: outcome.level, CERT_DIGEST: certificate["digest"]})
    summary = f"{summarize(certificate['checks'])}; certificate {path}"
    if outcome.reasons:
        summary = "; ".join(outcome.reasons[:3]) + f"; certificate {path}"
    if outcome.gpu_note:
        summary = outcome.gpu_note + "; " + summary
    return outcome.level, certificate, summary


def credentials_everywhere(engine: ContainerEngine, image_id: str) -> dict[str, Any]:
    """promise.credentials.all_homes: no credential file in any home, /root included, read as root through the engine.

    The payload's promise.credentials runs as the image's user, who cannot open /root; this reads the image's
    files without running anything, so no home is out of sight. Names paths and keys, never contents.
    """
    with engine.files(image_id) as read:
        homes = promises.passwd_homes((read("/etc/passwd") or b"").decode("utf-8", "replace"))
        found = promises.credentials_in(read, homes)
    detail = (f"no credential file in any home ({', '.join(homes)}), read through the engine" if not found
              else f"credentials in the image: {', '.join(found[:5])}")
    return {"name": "promise.credentials.all_homes", "status": "fail" if found else "pass", "detail": detail,
            "values": {"homes": homes, "found": found}}


def probe_engine(engine: ContainerEngine, cells: list[Cell], option: str, image: str | None = None) -> GpuPlan:
    """Plan the GPU request once per run: read `docker info`, then ask the engine's host through a container.

    The probe runs in `image` where one is given (a pulled image), else in the first cell's tested image.
    """
    paths = gpu_paths(engine.info())
    probe: DriverProbe | None = None
    if option != "none":
        image_id = image or next((i for c in cells
                                  if (i := find_tested_image(engine, c.tag, current_hash(engine, c)))), None)
        if image_id is not None:  # nothing built: nothing will run, so nothing to plan for
            probe = engine.gpu_probe(image_id, GpuRequest(count=-1, cdi=paths == {"cdi"}))
    plan = plan_gpus(option, paths, probe, engine.address)
    log.info("GPUs: %s%s", "requested" if plan.requested else "none requested",
             f" ({plan.note or plan.error})" if plan.note or plan.error else
             f" ({plan.probe.summary})" if plan.probe else "")
    return plan


def certify_cells(engine: ContainerEngine, cells: list[Cell], options: CertifyOptions) -> list[CertifyResult]:
    session = uuid.uuid4().hex
    gone = threading.Event()
    tidy(engine)  # what a run that died left here (its claims, containers) goes first
    plan = probe_engine(engine, cells, options.gpus, options.image)
    state = State(options.state_dir)

    def work(cell: Cell, stop: threading.Event) -> CertifyResult:
        started = time.monotonic()
        cert: dict[str, Any] | None = None
        if gone.is_set():  # the engine died under an earlier run: one line said so, not one per cell
            return CertifyResult(cell=cell, level="skipped", gpu_required=options.require_gpu)
        try:
            level, cert, summary = certify_one(engine, cell, options, session, stop, plan)
        except Interrupted:
            return CertifyResult(cell=cell, level="interrupted", seconds=time.monotonic() - started)
        except EngineGone as exc:  # no certificate, index entry, stamp or log of this run: the old ones stand
            gone.set()
            level, summary = "failed", str(exc)
        except BuilderError as exc:
            level, summary = "failed", str(exc)
        current = summary.startswith("current:")
        path = None
        if cert is not None:
            path = state.certificate_path(cell.tag)
            if not current:
                state.index_certificate(cell.tag, cert)  # tag -> level, digest, image, beside the certificates
        return CertifyResult(cell=cell, level=level, seconds=time.monotonic() - started, summary=summary,
                             certificate=path, gpu_required=options.require_gpu, current=current)

    def done(result: CertifyResult) -> None:
        log.info("%s: %s in %.0f s: %s", result.cell.tag, result.level, result.seconds, result.summary)

    def placeholder(cell: Cell, status: str) -> CertifyResult:
        return CertifyResult(cell=cell, level=status, gpu_required=options.require_gpu)

    try:
        return run_pool(cells, options.jobs, work, done, placeholder,
                        lambda: engine.remove_containers(f"{SESSION}={session}"))
    finally:
        engine.end_lease()
