"""Certify built images: run the smoke payload in a fresh container of each, decide a level, record it.

The certificate (JSON, one per image) is the proof; its level and digest are also stamped on the
image as labels, in a thin layer committed on top of the tested image, so `docker image inspect`
shows them wherever the image goes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from builder import __version__
from builder.engine import CERT_DIGEST, HASH, LEVEL, SESSION, Engine
from builder.errors import BuilderError, Interrupted
from builder.matrix.model import Cell
from builder.pool import run_pool
from builder.render import render
from builder.smoke.payload import host_driver  # the same probe the payload runs in a container
from builder.state import LEVELS, State

log = logging.getLogger("builder")

CERT_SCHEMA = 1
RESULT_PATH = "/tmp/builder-smoke/result.json"


@dataclass(frozen=True, kw_only=True)
class CertifyOptions:
    state_dir: Path
    gpus: str = "auto"  # auto, all, none, or a count
    require_gpu: bool = False
    timeout: float = 900.0
    memory: str = "8g"
    jobs: int = 1


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one certification decided, before it is written down."""

    level: str
    reasons: list[str]
    gpu_note: str | None


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
                       f"{cell.cuda} (GA driver {cell.driver_ga}): upgrade the driver; GPU checks skipped")
    if have < ga:
        return True, (f"host driver {driver} runs CUDA {cell.cuda} through minor-version compatibility; "
                      f"features that JIT-compile PTX need {cell.driver_ga} or newer")
    return True, None


def gpu_request(option: str, runtimes: set[str]) -> int | None:
    """How many GPUs to ask the engine for: None for none, -1 for all."""
    if option == "none":
        return None
    if option == "auto":
        return -1 if "nvidia" in runtimes else None
    if option == "all":
        return -1
    return int(option)


def decide(result: dict[str, Any] | None, exit_code: int | None, gpus: int | None, require_gpu: bool) -> Outcome:
    """The level an image earns from its payload's result."""
    if result is None:
        why = "the payload timed out" if exit_code is None else f"the payload wrote no result (exit {exit_code})"
        return Outcome(level="failed", reasons=[why], gpu_note=None)
    checks = result.get("checks") or []
    failed = [f"{c['name']}: {c['detail']}" for c in checks if c["status"] == "fail"]
    if exit_code not in (0, None) and not failed:
        failed.append(f"the payload exited with {exit_code}")
    if exit_code is None:
        failed.append("the payload timed out")
    gpu_passed = any(c["name"].startswith("gpu.") and c["status"] == "pass" for c in checks)
    if failed:
        level = "failed"
    elif gpus and gpu_passed:
        level = "gpu-certified"
    else:
        level = "cpu-verified"
    note = None
    if require_gpu and level == "cpu-verified":
        note = "--require-gpu: no GPU check ran (no GPU visible in the container)"
    return Outcome(level=level, reasons=failed, gpu_note=note)


def digest(certificate: dict[str, Any]) -> str:
    body = {k: v for k, v in certificate.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def find_tested_image(engine: Engine, tag: str, content_hash: str) -> str | None:
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


@dataclass(frozen=True, kw_only=True)
class CertifyResult:
    cell: Cell
    level: str  # one of LEVELS, or "not built", "skipped", "interrupted"
    seconds: float = 0.0
    summary: str = ""
    certificate: Path | None = None
    gpu_required: bool = False

    @property
    def ok(self) -> bool:
        return self.level == "gpu-certified" if self.gpu_required else self.level in LEVELS[1:]


def certify_one(engine: Engine, cell: Cell, options: CertifyOptions, session: str, stop: threading.Event,
                runtimes: set[str], driver: str | None) -> tuple[str, dict[str, Any] | None, str]:
    """Certify one cell; returns (level, certificate or None, one-line summary)."""
    context = render(cell)
    image_id = find_tested_image(engine, cell.tag, context.content_hash)
    if image_id is None:
        return "not built", None, "no image from the current matrix and templates: run `python -m builder build` first"
    if options.gpus not in ("auto", "none") and "nvidia" not in runtimes:
        # Asking anyway would fail at start with `could not select device driver "" with capabilities: [[gpu]]`.
        return "failed", None, (f"--gpus {options.gpus}: the engine at {engine.address} has no NVIDIA runtime "
                                "(install nvidia-container-toolkit and restart the engine, or use --gpus none)")
    gpus = gpu_request(options.gpus, runtimes)
    usable, driver_note = driver_shortfall(cell, driver)
    if gpus and not usable:
        gpus = None
    command = ["python", "/opt/builder/smoke/payload.py", "--claims", "/opt/builder/cell.json",
               "--out", RESULT_PATH, "--gpu", "auto"]
    started = datetime.now(timezone.utc)
    run = engine.run(image_id, command, labels={SESSION: session}, timeout=options.timeout,
                     mem_limit=options.memory, gpus=gpus, fetch=RESULT_PATH, stop=stop)
    log_path = State(options.state_dir).log_path(cell.tag, "certify")
    log_path.write_text(run.logs, encoding="utf-8")
    raw = next(iter(run.files.values()), None)
    try:
        result = json.loads(raw) if raw else None
    except ValueError:  # a payload killed mid-write leaves half a file: no result, and the level says so
        result = None
    outcome = decide(result, run.exit_code, gpus, options.require_gpu)
    inventory = (result or {}).get("inventory", {})
    certificate: dict[str, Any] = {
        "schema": CERT_SCHEMA,
        "tool": {"name": "builder", "version": __version__},
        "time": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image": {"id": image_id, "tag": cell.tag, "content_hash": context.content_hash},
        "cell": cell.claims(),
        "host": {"name": platform.node(), "engine": engine.address, "driver": driver,
                 "gpus_requested": gpus, "gpus": inventory.get("gpus", []), "driver_in_container":
                 inventory.get("driver")},
        "level": outcome.level,
        "reasons": outcome.reasons,
        "notes": [n for n in (driver_note, outcome.gpu_note) if n],
        "checks": (result or {}).get("checks", []),
        "inventory": inventory,
        "run": {"exit_code": run.exit_code, "seconds": round(run.seconds, 1), "log": str(log_path)},
    }
    certificate["digest"] = digest(certificate)
    path = State(options.state_dir).write_certificate(cell.tag, certificate)
    engine.stamp(image_id, cell.tag, {LEVEL: outcome.level, CERT_DIGEST: certificate["digest"]})
    passed = sum(c["status"] == "pass" for c in certificate["checks"])
    summary = f"{passed}/{len(certificate['checks'])} checks passed; certificate {path}"
    if outcome.reasons:
        summary = "; ".join(outcome.reasons[:3]) + f"; certificate {path}"
    if outcome.gpu_note:
        summary = outcome.gpu_note + "; " + summary
    return outcome.level, certificate, summary


def certify_cells(engine: Engine, cells: list[Cell], options: CertifyOptions) -> list[CertifyResult]:
    session = uuid.uuid4().hex
    runtimes = engine.runtimes()
    driver = host_driver()
    if options.gpus != "none" and "nvidia" not in runtimes:
        log.info("the engine at %s has no NVIDIA runtime: certifying on the CPU", engine.address)
    state = State(options.state_dir)

    def work(cell: Cell, stop: threading.Event) -> CertifyResult:
        started = time.monotonic()
        cert: dict[str, Any] | None = None
        try:
            level, cert, summary = certify_one(engine, cell, options, session, stop, runtimes, driver)
        except Interrupted:
            return CertifyResult(cell=cell, level="interrupted", seconds=time.monotonic() - started)
        except BuilderError as exc:
            level, summary = "failed", str(exc)
        path = None
        if cert is not None:
            path = state.certificate_path(cell.tag)
            state.index_certificate(cell.tag, cert)  # tag -> level, digest, image, beside the certificates
        return CertifyResult(cell=cell, level=level, seconds=time.monotonic() - started, summary=summary,
                             certificate=path, gpu_required=options.require_gpu)

    def done(result: CertifyResult) -> None:
        log.info("%s: %s in %.0f s: %s", result.cell.tag, result.level, result.seconds, result.summary)

    def placeholder(cell: Cell, status: str) -> CertifyResult:
        return CertifyResult(cell=cell, level=status, gpu_required=options.require_gpu)

    return run_pool(cells, options.jobs, work, done, placeholder,
                    lambda: engine.remove_containers(f"{SESSION}={session}"))
