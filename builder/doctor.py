"""`python -m builder doctor`: can this host run the matrix's images, on its GPUs, and if not, why not.

It reports the engine, the ways it hands out GPUs (NVIDIA runtime, hook, CDI), the driver and the
GPUs, then for every selected cell whether it runs here with a GPU, and why not. Where the driver is
too old for a cell, it names the newest certified tag of that framework the driver can run: from the
local certificates, or from a registry through `resolve`. With no GPU it says so, and why.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from builder.certify import driver_shortfall
from builder.engine import MANAGED, ContainerEngine, Engine, GpuRequest
from builder.errors import BuilderError, EngineError
from builder.gpu import DriverProbe, gpu_paths, probe_local
from builder.matrix.model import Cell
from builder.state import State, level_at_least

log = logging.getLogger("builder")

WAYS = {"runtime": "NVIDIA runtime", "hook": "NVIDIA hook", "cdi": "CDI devices"}


@dataclass(frozen=True, kw_only=True)
class EngineFacts:
    """What the engine said about itself, and what nvidia-smi said in a container it ran with GPUs."""

    address: str
    error: str | None = None  # unreachable: why
    version: str | None = None
    runtimes: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # runtime, hook, cdi
    probe: DriverProbe | None = None  # the engine host's driver, seen from a container
    probe_note: str | None = None  # why there is no probe
    refused: bool = False  # a GPU request was refused: no runtime, hook or CDI device

    @property
    def local(self) -> bool:
        return self.address.startswith(("unix://", "npipe://"))


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A certified image somewhere: its tag, what it needs of the driver, and where it was found."""

    tag: str
    framework: str
    version: str
    python: str
    cuda: str | None
    driver_floor: str | None
    level: str
    where: str  # "local" or the registry reference


@dataclass(frozen=True, kw_only=True)
class Verdict:
    tag: str
    cuda: str
    driver_min: str
    gpu: str  # "yes", "no", "cpu cell"
    why: str
    local: str  # the local certificate's level, or "-"
    instead: str | None = None  # where the driver is too old: the newest certified tag it can run


@dataclass(frozen=True, kw_only=True)
class Report:
    engine: EngineFacts
    local_driver: DriverProbe
    driver: DriverProbe | None  # the driver containers would use, where known
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- engine
def engine_facts(engine: ContainerEngine | None, error: str | None, address: str,
                 probe_image: str | None) -> EngineFacts:
    """Read `docker info`, then run nvidia-smi with a GPU request in `probe_image` (the hook shows no other way)."""
    if engine is None:
        return EngineFacts(address=address, error=error or "unreachable")
    try:
        info = engine.info()
    except EngineError as exc:
        return EngineFacts(address=address, error=str(exc))
    paths = gpu_paths(info)
    facts = EngineFacts(address=engine.address, version=str(info.get("ServerVersion") or "") or None,
                        runtimes=tuple(sorted(info.get("Runtimes") or {})), paths=tuple(sorted(paths)))
    if probe_image is None:
        note = "no builder image on the engine to run nvidia-smi in (build one first): the NVIDIA hook was not probed"
        return replace(facts, probe_note=note)
    try:
        probe = engine.gpu_probe(probe_image, GpuRequest(count=-1, cdi=paths == {"cdi"}))
    except BuilderError as exc:
        return replace(facts, probe_note=f"the GPU probe failed: {exc}")
    if probe is None:
        return replace(facts, refused=True,
                       probe_note="the engine refused a GPU request: no NVIDIA runtime, hook or CDI device")
    # A GPU request served with no runtime or CDI: the NVIDIA hook is on dockerd's PATH.
    return replace(facts, probe=probe, paths=facts.paths or ("hook",))


def effective_driver(engine: EngineFacts, local: DriverProbe) -> DriverProbe | None:
    """The driver the engine's containers get: seen from one of them, else this machine's for a local engine."""
    if engine.probe is not None:
        return engine.probe
    if engine.local or engine.error:
        return local
    return None


# --------------------------------------------------------------------------------------- candidates
def local_candidates(state: State) -> list[Candidate]:
    """Certified images in the local state, with what their certificates say they need."""
    out = []
    for entry in state.certified():
        cert = state.read_certificate(entry.tag) or {}
        cell = cert.get("cell") or {}
        if not cell.get("framework") or not cell.get("version"):
            continue
        out.append(Candidate(tag=entry.tag, framework=str(cell["framework"]), version=str(cell["version"]),
                             python=str(cell.get("python") or ""), cuda=cell.get("cuda"),
                             driver_floor=cell.get("driver_floor"), level=entry.level, where="local"))
    return out


def registry_candidates(registry: str, cells: list[Cell], driver: str | None) -> tuple[list[Candidate], str | None]:
    """Certified images in `registry` among `cells` that `driver` can run, through builder.publish's resolve.

    Only the selected cells are looked up (one manifest and certificate each): select wider, for
    example `--framework torch`, to find older CUDA lines. Returns (candidates, a note for the reader).
    """
    try:
        publish = importlib.import_module("builder.publish")
    except ImportError:
        return [], f"--registry {registry}: this builder has no `resolve` (builder/publish.py): local certificates only"
    resolve_cells: Callable[..., Any] | None = getattr(publish, "resolve_cells", None)
    if resolve_cells is None:
        return [], f"--registry {registry}: builder.publish has no resolve_cells(): local certificates only"
    if driver is None:
        return [], f"--registry {registry}: not asked, no driver to compare with"
    have = _version(driver)
    wanted = [c for c in cells if c.cuda and c.driver_floor and _version(c.driver_floor) <= have]
    if not wanted:
        return [], None
    try:
        found = resolve_cells(wanted, registry, "cpu-verified")
    except BuilderError as exc:
        return [], f"--registry {registry}: {exc}"
    out = [Candidate(tag=r.cell.tag, framework=r.cell.framework, version=r.cell.version, python=r.cell.python,
                     cuda=r.cell.cuda, driver_floor=r.cell.driver_floor, level=str(r.level), where=str(r.reference))
           for r in found if getattr(r, "ok", False)]
    return out, f"--registry {registry}: {len(out)} of {len(wanted)} cell(s) this driver runs are certified there"


def _version(text: str | None) -> Version:
    try:
        return Version(text or "0")
    except InvalidVersion:
        return Version("0")


def newest_runnable(cell: Cell, driver: str, candidates: list[Candidate]) -> Candidate | None:
    """The newest certified GPU image of the cell's framework that `driver` runs (same Python first)."""
    have = _version(driver)
    runnable = [c for c in candidates if c.framework == cell.framework and c.cuda is not None
                and c.driver_floor is not None and _version(c.driver_floor) <= have
                and level_at_least(c.level, "cpu-verified")]
    if not runnable:
        return None
    return max(runnable, key=lambda c: (c.python == cell.python, _version(c.version), _version(c.cuda),
                                        c.level == "gpu-certified", c.where == "local"))


# ---------------------------------------------------------------------------------------- verdicts
def verdict(cell: Cell, engine: EngineFacts, driver: DriverProbe | None, local_level: str | None,
            candidates: list[Candidate]) -> Verdict:
    base = {"tag": cell.tag, "cuda": cell.cuda or "cpu", "driver_min": cell.driver_floor or "-",
            "local": local_level or "-"}
    if engine.error:
        return Verdict(**base, gpu="no", why=f"no engine: {engine.error}")
    if cell.cuda is None:
        return Verdict(**base, gpu="cpu cell", why="runs on the CPU wherever the engine runs")
    if driver is None and engine.refused:
        return Verdict(**base, gpu="no", why=f"the engine at {engine.address} cannot hand out GPUs (no NVIDIA "
                       "runtime, hook or CDI device); its host's driver is unknown")
    if driver is None:
        return Verdict(**base, gpu="unknown", why=f"the engine at {engine.address} is not this machine and "
                       f"could not be probed ({engine.probe_note or 'no probe'}): its driver is unknown")
    if driver.version is None:
        return Verdict(**base, gpu="no", why=f"no NVIDIA driver ({driver.error}): runs on the CPU only")
    usable, note = driver_shortfall(cell, driver.version)
    if not usable:
        better = newest_runnable(cell, driver.version, candidates)
        instead = (f"{better.tag} ({better.level}, needs driver {better.driver_floor}, {better.where})"
                   if better else None)
        why = (f"driver {driver.version} is older than {cell.driver_floor}, the oldest that runs CUDA {cell.cuda}: "
               "upgrade the driver" + ("" if better else "; no certified image of "
                                       f"{cell.framework} that this driver runs is known"))
        return Verdict(**base, gpu="no", why=why, instead=instead)
    if not driver.gpus:
        return Verdict(**base, gpu="no", why=f"driver {driver.version} but no GPU listed ({driver.error or 'none'})")
    if not engine.paths:
        return Verdict(**base, gpu="no", why=f"{len(driver.gpus)} GPU(s), but the engine has no NVIDIA runtime, "
                       "hook or CDI device: install the NVIDIA Container Toolkit and restart the engine")
    ways = ", ".join(WAYS[p] for p in engine.paths)
    return Verdict(**base, gpu="yes", why=f"driver {driver.version} >= {cell.driver_floor}, {len(driver.gpus)} "
                   f"GPU(s) through the {ways}" + (f"; {note}" if note else ""))


def diagnose(cells: list[Cell], engine: EngineFacts, local_driver: DriverProbe, state: State,
             extra_candidates: list[Candidate] | None = None, notes: list[str] | None = None) -> Report:
    driver = effective_driver(engine, local_driver)
    index = state.index()
    candidates = local_candidates(state) + list(extra_candidates or [])
    verdicts = [verdict(c, engine, driver, index[c.tag].level if c.tag in index else None, candidates)
                for c in cells]
    return Report(engine=engine, local_driver=local_driver, driver=driver, verdicts=verdicts, notes=list(notes or []))


# ------------------------------------------------------------------------------------------- output
def _table(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


def render_text(report: Report) -> str:
    e = report.engine
    if e.error:
        engine = f"unreachable: {e.error}"
    else:
        ways = ", ".join(WAYS[p] for p in e.paths) or "none (no NVIDIA runtime, hook or CDI device)"
        engine = (f"{e.address}, Docker {e.version or '?'}; runtimes: {', '.join(e.runtimes) or '-'}; "
                  f"GPUs handed out through: {ways}")
    lines = [f"engine         {engine}",
             f"this machine   {report.local_driver.summary}"]
    if e.probe is not None:
        lines.append(f"engine's host  {e.probe.summary} ({e.probe.source})")
    elif e.probe_note and not e.error:
        lines.append(f"engine's host  not probed: {e.probe_note}")
    d = report.driver
    lines.append("GPUs           " + (", ".join(d.gpus) if d and d.gpus else
                                      "none" + (f" ({d.error})" if d and d.error else "")))
    rows = [{"cell": v.tag, "cuda": v.cuda, "driver min": v.driver_min, "gpu": v.gpu, "certified here": v.local,
             "why": v.why} for v in report.verdicts]
    if rows:
        lines += ["", _table(rows)]
    for v in report.verdicts:
        if v.instead:
            lines.append(f"instead of {v.tag}: {v.instead}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run
def run(cells: list[Cell], *, state_dir: Path, registry: str | None = None,
        connect: Callable[[], ContainerEngine] = Engine.connect,
        local: Callable[[], DriverProbe] = probe_local) -> Report:
    """Everything doctor finds out, without changing anything (the probe container is removed)."""
    engine: ContainerEngine | None = None
    error = None
    try:
        engine = connect()
        address = engine.address
    except EngineError as exc:
        error, address = str(exc), "the Docker engine"
    probe_image = None
    if engine is not None:
        try:
            managed = engine.images_with_label(MANAGED)
            probe_image = managed[0].id if managed else None
        except EngineError as exc:
            error = str(exc)
            engine = None
    facts = engine_facts(engine, error, address, probe_image)
    notes: list[str] = []
    extra: list[Candidate] = []
    local_driver = local()
    if registry:
        driver = effective_driver(facts, local_driver)
        extra, note = registry_candidates(registry, cells, driver.version if driver else None)
        if note:
            notes.append(note)
    return diagnose(cells, facts, local_driver, State(state_dir), extra, notes)


def main(cells: list[Cell], *, state_dir: Path, registry: str | None, fmt: str) -> int:
    report = run(cells, state_dir=state_dir, registry=registry)
    print(json.dumps(report.to_json(), indent=2) if fmt == "json" else render_text(report))
    return EngineError.exit_code if report.engine.error else 0
