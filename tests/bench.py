"""`make bench`: builder against the naive recipe, side by side in one run; writes docs/bench.json and docs/bench.md.

The naive recipe is what a team without builder writes: one single-stage Dockerfile per cell on the same base,
apt's python3 and python3-venv, `pip install` of the same pins into a venv with the host's CA bundle copied in,
built by the classic builder through the SDK with its own layer cache. Absolute times on a shared 2-core machine
are noise, so every figure is a ratio against that baseline measured in the same run.

    python -m tests.bench [SELECTORS]          # default: no cold builds (builds what a no-op needs, once)
    BENCH_FULL=1 python -m tests.bench ...     # adds the cold and warm builds of the selected cell, then its
                                               # Python-only sibling through the package cache they filled
    BENCH_OUT=bench-torch python -m tests.bench --framework torch==2.4.1 ...   # docs/bench-torch.{md,json}
    BENCH_ONLY=sibling python -m tests.bench ...   # only the Python-only sibling (two builds), printed, no docs/
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REPOSITORY = "bench"  # the bench's own images: bench/..., bench-naive/..., bench-small/...
NAIVE_LABEL = "org.builder.bench.naive"
DEFAULT_SELECT = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
# Ten small cells for the ten-cell no-op: the TensorFlow CPU adapter with a tiny pure-Python package standing
# in for the framework (the up-to-date path reads labels, never the image's bytes, so size does not matter).
SMALL_PACKAGE = "six"
SMALL_VERSIONS = ("1.8.0", "1.9.0", "1.10.0", "1.11.0", "1.12.0", "1.13.0", "1.14.0", "1.15.0", "1.16.0",
                  "1.17.0")
# Where a BENCH_FULL run keeps the cell's cold-build record and its Python-only sibling's, in the bench's state.
SIBLING_PAIR = "bench-sibling.json"
# A wheel built for one CPython (cp39, cp311, ...): the only thing a Python-only sibling should fetch again.
CP_TAG = re.compile(r"-cp(\d+)-")
# The nvidia/cuda runtime bases the naive recipe would start FROM, as published: no registry is reachable here,
# so the naive image's size on that base is computed from these (uncompressed bytes, what `docker images` shows
# after a pull). A per-layer breakdown was not found in reachable public material; the whole image is enough for
# the sum. Add a tag with its source to compute another CUDA line.
NVIDIA_CUDA_PUBLISHED: dict[str, dict[str, Any]] = {
    "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04": {
        "bytes": 3_379_534_165,
        "layers": 10,
        "config": "sha256:02f0c5f1a54bd88a5242a21ef690ab6826c7d36eb2b8134b32860a258427d97e",
        "source": "github.com/AhmadAFS1/MuseTalk, docs/GHCR_PUBLICATION_FINDINGS.md at c06624da9d7c (the pulled "
                  "base's image config digest, 3,379,534,165 uncompressed bytes, ten layers); the same image id "
                  "02f0c5f1a54b shows as 3.38GB in `docker images` output quoted in other public READMEs",
    },
}


@dataclass(frozen=True, kw_only=True)
class Row:
    name: str
    figure: float | None
    baseline: float | None
    unit: str
    target: str  # e.g. "<= 1.0": compared with the ratio (figure / baseline), or the figure when no baseline
    limit: float | None
    runs: str  # "median of 3" or "1 run"
    how: str  # "measured" or "computed", and from what
    note: str = ""
    verdict: bool | None = None  # met or not where the target is no number (e.g. a list that must be empty)

    @property
    def ratio(self) -> float | None:
        if self.figure is None or not self.baseline:
            return None
        return self.figure / self.baseline

    @property
    def met(self) -> bool | None:
        if self.verdict is not None:
            return self.verdict
        value = self.ratio if self.baseline is not None else self.figure
        if value is None or self.limit is None:
            return None
        return value <= self.limit


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


def medians_interleaved(runs: int, first: Callable[[], float], second: Callable[[], float]) -> tuple[float, float]:
    """Each side's median over `runs` runs taken in turns (first, second, first, ...) after one untimed run of
    each: both sides meet the same moment's machine, which a 2-core shared host changes by tens of percent."""
    first(), second()
    pairs = [(first(), second()) for _ in range(runs)]
    return statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown(rows: list[Row], header: str) -> str:
    """The table the README links to: one row per figure, with its baseline, ratio, target and verdict."""
    lines = [header, "", "| figure | builder | naive baseline | ratio | target | met | runs | how |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(f"| {r.name} | {_num(r.figure, r.unit)} | {_num(r.baseline, r.unit)} | "
                     f"{'-' if r.ratio is None else f'{r.ratio:.2f}'} | {r.target} | {met} | {r.runs} | {r.how} |")
    notes = [f"- **{r.name}**: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def naive_dockerfile(base_image: str, requirements: list[str]) -> str:
    """The obvious recipe: single stage, system Python, the CA bundle copied in, pip into a venv."""
    pins = " ".join(requirements)
    return (f"FROM {base_image}\n"
            "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv "
            "&& rm -rf /var/lib/apt/lists/*\n"
            "COPY ca.pem /etc/ssl/pip-ca.pem\n"
            f"RUN python3 -m venv /opt/venv && PIP_CERT=/etc/ssl/pip-ca.pem /opt/venv/bin/pip install "
            f"--no-cache-dir {pins}\n"
            "ENV PATH=/opt/venv/bin:$PATH\n")


def context_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def floor_bytes(history: list[dict[str, Any]]) -> int:
    """The least an image of this cell can weigh: the base OS, the Python install and the installed environment,
    from `docker history`; users, claims and caches are the overhead. The classic builder writes a stage copy
    (`COPY --from=builder /opt/venv ...`) as `COPY dir:<digest> in /opt/venv`; an imported base has no CreatedBy."""
    total = 0
    for layer in history:
        created = str(layer.get("CreatedBy") or "")
        if (not created or ("apt-get install" in created and "python" in created) or "COPY --from=builder" in created
                or "#(nop) COPY dir:" in created or is_install_step("RUN " + created.split("/bin/sh -c ", 1)[-1])):
            total += int(layer.get("Size") or 0)
    return total


def nvidia_cuda_runtime(matrix_doc: dict[str, Any], cuda: str | None) -> str | None:
    """The nvidia/cuda runtime tag (with the matrix's cuDNN) a naive recipe for this CUDA line would start FROM;
    None for a CPU cell, where that base makes no sense."""
    line = (matrix_doc.get("cuda") or {}).get(cuda or "cpu")
    if not line or not line.get("image"):
        return None
    image = line["image"]
    oses = list(image.get("os") or ["ubuntu22.04"])
    os_tag = "ubuntu22.04" if "ubuntu22.04" in oses else oses[-1]
    cudnn = f"-{image['cudnn']}" if image.get("cudnn") else ""
    return f"nvidia/cuda:{image['tag']}{cudnn}-runtime-{os_tag}"


def naive_on_published_base(naive_size: int, own_base_size: int, published_base: int) -> int:
    """The naive image's size on another base: its own layers above the base it was built on (Python, the CA
    bundle, the venv), on top of the published base's bytes."""
    return published_base + naive_size - own_base_size


class Usage:
    """What a run used of the machine, from /proc: CPU busy time (all cores), bytes written to disk and bytes
    received on the network, between start() and stop(). Says what limits a parallel build."""

    def __init__(self) -> None:
        self.start_at: tuple[float, int, int, int] = (0.0, 0, 0, 0)
        self.cpu_s = self.disk_mb = self.net_mb = self.seconds = 0.0

    @staticmethod
    def _now() -> tuple[float, int, int, int]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        busy = sum(int(v) for v in fields) - int(fields[3]) - int(fields[4])  # all but idle and iowait
        written = 0
        for line in Path("/proc/diskstats").read_text().splitlines():
            parts = line.split()
            if re.fullmatch(r"(sd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+)", parts[2]):
                written += int(parts[9]) * 512
        received = sum(int(line.split(":", 1)[1].split()[0]) for line in
                       Path("/proc/net/dev").read_text().splitlines()[2:] if not line.strip().startswith("lo:"))
        return time.monotonic(), busy, written, received

    def start(self) -> None:
        self.start_at = self._now()

    def stop(self) -> None:
        end, (t0, busy0, disk0, net0) = self._now(), self.start_at
        self.seconds = end[0] - t0
        self.cpu_s = (end[1] - busy0) / os.sysconf("SC_CLK_TCK")
        self.disk_mb, self.net_mb = (end[2] - disk0) / 1e6, (end[3] - net0) / 1e6

    def text(self) -> str:
        cores = os.cpu_count() or 1
        share = self.cpu_s / (self.seconds * cores) if self.seconds else 0.0
        return (f"CPU {share:.0%} of {cores} cores busy, disk {self.disk_mb:,.0f} MB written "
                f"({self.disk_mb / max(self.seconds, 1e-9):.0f} MB/s), network {self.net_mb:,.0f} MB in")


def decomposition(steps: list[list[Any]]) -> str:
    """Where a build's time went, from its record's steps ([n, instruction, seconds, seconds after the step's
    last output line]): the OS Python layer; the install steps (in a direct build uv fetches through the proxy
    and installs at once, then the classic builder commits the layer: the time after a step's last output line);
    the builder-stage form's export into the final stage (COPY --from=builder: copy and commit); every other step
    (metadata, user, labels)."""
    # Records older than the fourth item cannot split an install step: it is named whole.
    split = any(len(step) > 3 for step in steps if is_install_step(str(step[1])))
    until = "install steps until their last output (fetch, install)" if split else "install steps (fetch, install, commit)"
    parts = {"OS Python (apt)": 0.0, until: 0.0, "install steps after it (layer commit)": 0.0,
             "export (COPY --from=builder, copy and commit)": 0.0, "other steps": 0.0}
    for step in steps:
        text, seconds, after = str(step[1]), float(step[2]), after_output(step)
        if is_install_step(text):
            parts[until] += seconds - after
            parts["install steps after it (layer commit)"] += after
        else:
            parts["OS Python (apt)" if is_apt_step(text) else
                  "export (COPY --from=builder, copy and commit)" if text.startswith("COPY --from=builder") else
                  "other steps"] += seconds
    total = sum(parts.values()) or 1.0
    return ", ".join(f"{name} {s:.0f} s ({s / total:.0%})" for name, s in parts.items() if s or "(fetch" in name)


def after_output(step: list[Any]) -> float:
    """A record step's seconds after its last output line (the classic builder's commit of a RUN); 0 where the
    record kept none (older records, steps with no output)."""
    return min(float(step[3]), float(step[2])) if len(step) > 3 and step[3] is not None else 0.0


def install_commits(steps: list[list[Any]]) -> float | None:
    """A build's install steps' seconds after their last output line (their layer commits, with each step's last
    shell commands); None where the record has no install step or one of them lacks that split."""
    installs = [s for s in steps if is_install_step(str(s[1]))]
    if not installs or any(len(s) < 4 or s[3] is None for s in installs):
        return None
    return sum(after_output(s) for s in installs)


def commit_share(builder: list[list[Any]], naive: list[list[Any]]) -> str:
    """Both builds' time with their install steps' layer commits taken out: what the engine's commit (the layer
    tarred and written again into its store, the same for any classic build of these bytes) leaves to compare."""
    def total(steps: list[list[Any]]) -> float:
        return sum(float(s[2]) for s in steps)

    b, n = install_commits(builder), install_commits(naive)
    if not b or not n:
        return "(no commit split: a step record without its last-output time)"
    rest_b, rest_n = total(builder) - b, total(naive) - n
    return (f"Layer commits: builder {b:.0f} s, naive {n:.0f} s; the steps' time without them: builder "
            f"{rest_b:.0f} s, naive {rest_n:.0f} s ({rest_b / max(rest_n, 1e-9):.2f})")


def _inflated(path: Path) -> int:
    total = 0
    with zipfile.ZipFile(path) as wheel:
        for member in wheel.infolist():
            with wheel.open(member) as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    return total


def inflate_seconds(wheels: list[Path]) -> tuple[float, int]:
    """CPU seconds this process spends inflating every member of `wheels` into memory (zlib, nothing written),
    and the bytes inflated: the work any install of these wheels does before it writes a byte. Each wheel is
    read once first, so that the page cache, not the disk, serves the timed pass."""
    for wheel in wheels:
        with wheel.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    started = time.process_time()
    total = sum(_inflated(wheel) for wheel in wheels)
    return time.process_time() - started, total


def shared_parts(builder: list[list[Any]], naive: list[list[Any]]) -> tuple[float, float] | None:
    """The parts of a warm build that both recipes pay in the same run, each the lesser of the two builds'
    seconds: the install steps' time after their last output line (mostly the engine's layer commit of the same
    bytes, with the step's last shell commands) and the OS Python step (the same apt packages, indexes fetched
    fresh). None where either build lacks an apt step or a step's commit split."""
    def apt(steps: list[list[Any]]) -> float:
        return sum(float(s[2]) for s in steps if is_apt_step(str(s[1])))

    b, n = install_commits(builder), install_commits(naive)
    if b is None or n is None or not apt(builder) or not apt(naive):
        return None
    return min(b, n), min(apt(builder), apt(naive))


def locked_wheels(cache: Path, fetched: dict[str, int], lock: list[str]) -> tuple[list[Path], int]:
    """The package cache's copies of the wheels a cold build fetched whose name and version the lock pins (one
    copy each), and how many pins the lock has. A wheel fetched for its metadata alone (another version) is not
    installed, so not counted."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version

    pins: set[tuple[str, Version]] = set()
    for pin in lock:
        name, _, version = pin.partition("==")
        with contextlib.suppress(InvalidVersion):
            pins.add((canonicalize_name(name), Version(version)))
    found: list[Path] = []
    for file in sorted(fetched):
        try:
            name, version, _, _ = parse_wheel_filename(urllib.parse.unquote(file))
        except InvalidWheelFilename:
            continue
        if (name, version) in pins:
            found += sorted(cache.glob(f"*/*-{glob.escape(file)}"))[:1]
    return found, len(pins)


def shared_row(cache: Path, fetched: dict[str, int], lock: list[str], builder: list[list[Any]],
               naive: list[list[Any]], naive_warm: float) -> Row:
    """What both recipes' warm builds pay in this run (shared_parts), plus inflating the cell's wheels spread
    evenly over every core (inflate_seconds / cores), against the naive warm build: an estimate of what no
    classic build of this image gets under on this machine."""
    name = "warm build: the parts any classic build pays (estimate)"
    wheels, pinned = locked_wheels(cache, fetched, lock)
    parts = shared_parts(builder, naive)
    if parts is None or not wheels:
        return Row(name=name, figure=None, baseline=naive_warm, unit="s", target="report", limit=None, runs="-",
                   how="not measured", note="a build record without an apt step or a commit split" if parts is None
                   else "the cold build's wheels are not in the package cache")
    commit, apt = parts
    cores = os.cpu_count() or 1
    cpu, inflated = inflate_seconds(wheels)
    packed = sum(w.stat().st_size for w in wheels)
    return Row(name=name, figure=commit + apt + cpu / cores, baseline=naive_warm, unit="s", target="report",
               limit=None, runs="1 run", how="computed from measured parts",
               note=f"each the lesser of the two builds' figures in this run: the install steps after their last "
                    f"output line {commit:.0f} s (the engine's layer commit of the same bytes, and the steps' last "
                    f"shell commands) and the OS Python step {apt:.0f} s (the same apt packages, the indexes "
                    f"fetched fresh); plus inflating {len(wheels)} of the lock's {pinned} pins' wheels "
                    f"({packed / 1e6:,.0f} MB to {inflated / 1e6:,.0f} MB, the others come with the venv or are "
                    f"not cached) with Python's zlib: {cpu:.1f} CPU seconds, spread evenly over {cores} cores "
                    f"{cpu / cores:.1f} s, nothing written. Resolving, downloading and writing the files are not "
                    "counted; an installer with a faster inflate than zlib's would need less")


def install_seconds(steps: list[list[Any]]) -> float:
    """The install steps' seconds in a record's steps (three or four items each, as records kept them)."""
    return sum(float(step[2]) for step in steps if is_install_step(str(step[1])))


def is_apt_step(instruction: str) -> bool:
    """The OS Python step: apt installs the base's Python (builder's template and the naive recipe alike; the bench
    builds no devel cell, whose compilers come in a later apt step). A record keeps an instruction's first 80
    characters: builder's step starts by marking its start time, so `apt-get update` is what is sure to be there."""
    return instruction.startswith("RUN") and "apt-get update" in instruction


def is_install_step(instruction: str) -> bool:
    """An install RUN, whichever installer it names: it makes the venv (`python -m venv`, `uv venv`) and installs
    into it (`pip install`, `uv pip install`), or, in a direct build, starts by pointing uv at the proxy
    (`UV_INDEX_URL=`). A record keeps only an instruction's first 80 characters, so any one of these marks it."""
    return instruction.startswith("RUN") and any(
        word in instruction for word in (" -m venv ", "uv venv ", "pip install", "uv pip ", "UV_INDEX_URL="))


def project_of(name: str) -> str:
    """The project a fetched file belongs to: a wheel's or sdist's distribution name (normalized, PEP 503), a
    .deb's package name; the file name itself for anything else. A wheel's PEP 658 `.metadata` counts as the
    wheel's."""
    name = name.removesuffix(".metadata")
    if name.endswith(".whl"):
        return re.sub(r"[-_.]+", "-", name.split("-", 1)[0]).lower()
    if name.endswith((".tar.gz", ".zip", ".tar.bz2")):
        return re.sub(r"[-_.]+", "-", name.rsplit("-", 1)[0]).lower()
    if name.endswith(".deb"):
        return name.split("_", 1)[0]
    return name


@dataclass(frozen=True, kw_only=True)
class Refetched:
    """What a second cell fetched upstream through a package cache the first had filled, by file name -> bytes,
    sorted by the projects the first fetched."""
    cp: dict[str, int]  # a cp-tagged wheel of a project the first fetched for another CPython: expected
    same: dict[str, int]  # a file the first fetched already: the cache missed
    versions: dict[str, int]  # another file of a project the first fetched (another version, not cp-tagged)
    python: dict[str, int] = field(default_factory=dict)  # another version: the first's excludes this Python
    debs: dict[str, int]  # another .deb of a package the first's apt fetched: the sibling's base is another release
    new: dict[str, int]  # of projects the first never fetched (a backport for this Python, that Python's .debs)

    @property
    def met(self) -> bool:
        """The target: of the index's files, nothing but cp-tagged wheels again. The .debs are the OS's, whose
        release comes with the Python a Python-only sibling asks for; they are listed, not counted."""
        return not self.same and not self.versions


def twice_fetched(first: dict[str, int], second: dict[str, int], python: str | None = None,
                  requires_python: Callable[[str], str | None] = lambda name: None) -> Refetched:
    """Split what the second cell fetched upstream (its record's `fetched_files`) by what the first fetched. The
    same file name twice means the cache missed, whatever its tag; a cp-tagged file of a project the first had
    as another file is what a Python-only sibling must fetch again, and so is another version of a pure wheel
    where the first's version does not install on the sibling's `python` (`requires_python` of the first's file
    name: its Requires-Python, None where unknown)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    was = {project_of(name): name for name in first}
    parts: dict[str, dict[str, int]] = {"cp": {}, "same": {}, "versions": {}, "python": {}, "debs": {}, "new": {}}
    for name, size in second.items():
        part = ("same" if name in first else "new" if project_of(name) not in was else
                "cp" if CP_TAG.search(name) else "debs" if name.endswith(".deb") else "versions")
        if part == "versions" and python and (spec := requires_python(was[project_of(name)])):
            with contextlib.suppress(InvalidSpecifier):
                part = "versions" if SpecifierSet(spec).contains(python) else "python"
        parts[part][name] = size
    return Refetched(**parts)


def pypi_requires_python(filename: str) -> str | None:
    """A wheel's Requires-Python as PyPI's JSON API gives it for that very file; None where unknown."""
    import urllib.request

    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        name, version, _, _ = parse_wheel_filename(filename)
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as resp:
            files = json.load(resp)["releases"].get(str(version)) or []
    except (InvalidWheelFilename, OSError, ValueError, KeyError):
        return None
    return next((str(f.get("requires_python") or "") or None for f in files if f.get("filename") == filename), None)


# The diff id of a layer that changes nothing (an empty tar): a RUN that wrote no file makes one, of 0 bytes.
EMPTY_LAYER = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
# Metadata-only instructions: the classic builder writes them as `#(nop)  ENV ...`, BuildKit as `ENV ...`; they
# add a history entry but no layer.
METADATA = re.compile(r"^(/bin/sh -c )?(#\(nop\)\s*)?(ENV|LABEL|CMD|USER|WORKDIR|EXPOSE|ENTRYPOINT|ARG|SHELL|"
                      r"VOLUME|STOPSIGNAL|HEALTHCHECK|ONBUILD|MAINTAINER)\b")


def layer_sizes(history: list[dict[str, Any]], diff_ids: list[str]) -> list[tuple[str, int]]:
    """An image's layers as (diff id, bytes), from `docker history` (newest first: each entry's size, but no
    flag for the entries that made no layer) and the image's RootFS diff ids (oldest first). The entries with
    bytes pair in order with the diff ids that are not the empty layer; where a layer of no bytes but not empty
    breaks that count, every entry that is not metadata-only (an imported base has no CreatedBy) pairs with a
    diff id. Raises ValueError when neither pairs up."""
    oldest_first = list(reversed(history))
    sized = [int(h.get("Size") or 0) for h in oldest_first if int(h.get("Size") or 0) > 0]
    if len(sized) == sum(d != EMPTY_LAYER for d in diff_ids):
        sizes = iter(sized)
        return [(d, 0 if d == EMPTY_LAYER else next(sizes)) for d in diff_ids]
    made = [int(h.get("Size") or 0) for h in oldest_first
            if int(h.get("Size") or 0) > 0 or not METADATA.match(str(h.get("CreatedBy") or "").strip())]
    if len(made) != len(diff_ids):
        raise ValueError(f"{len(sized)} history entries with bytes for {len(diff_ids)} diff ids")
    return list(zip(diff_ids, made, strict=True))


def unique_layer_bytes(*images: list[tuple[str, int]]) -> tuple[int, int]:
    """(bytes of the distinct layers, sum of the images' sizes): what a registry or an engine stores for these
    images, a layer shared by diff id once, against what they weigh one by one."""
    unique: dict[str, int] = {}
    for layers in images:
        unique.update(layers)
    return sum(unique.values()), sum(size for layers in images for _, size in layers)


# What a Python-only sibling shares with its cell: all of these claims, and a different Python.
SIBLING_SAME = ("framework", "version", "cuda", "cudnn", "flavor", "cuda_source", "index")


def pick_sibling(cell: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of the matrix's cells (`matrix --format json` rows), the one that differs from `cell` only in Python (and
    so in the base or Python source that Python comes from): the same OS family first, then the nearest Python."""
    mine = cell["claims"]

    def minor(version: str) -> int:
        return int(version.split(".")[1])

    found = [c for c in candidates if c["claims"]["python"] != mine["python"]
             and all(c["claims"].get(k) == mine.get(k) for k in SIBLING_SAME)]
    return min(found, default=None, key=lambda c: (
        c["claims"]["base"]["family"] != mine["base"]["family"],
        abs(minor(c["claims"]["python"]) - minor(mine["python"])), c["claims"]["python"]))


def with_sibling(text: str, cell: dict[str, Any], python: str) -> str:
    """The bench matrix asking for `cell` again on `python`, in a group of its own over every base of the matrix
    (expand picks the first that fits): for a cell the matrix has on one Python only."""
    doc = yaml.safe_load(text)
    claims = cell["claims"]
    entry = {"version": claims["version"], "cuda": cell["cuda"], "python": python, "flavor": claims["flavor"]}
    doc["images"].append({"framework": claims["framework"], "bases": list(doc["bases"]), "include": [entry]})
    return yaml.safe_dump(doc, sort_keys=False)


def synthetic_matrix(text: str, copies: int) -> str:
    """The project's matrix with every framework version cloned `copies` times (2.4.1 -> 2.4.101, 2.4.102, ...):
    the same rules, bases and groups, about 82 x (copies + 1) cells."""
    doc = yaml.safe_load(text)
    clones: dict[str, list[str]] = {}
    for framework in doc["frameworks"].values():
        versions = framework["versions"]
        for version in list(versions):
            clones[version] = [f"{version}{i:02d}" for i in range(1, copies + 1)]
            for clone in clones[version]:
                versions[clone] = versions[version]
    for group in doc["images"]:
        axis = (group.get("axes") or {}).get("version")
        if axis:
            group["axes"]["version"] = [v for version in axis for v in (version, *clones.get(version, []))]
        for entry in group.get("include") or []:
            if "version" in entry:
                group["include"] = [*group["include"], *({**entry, "version": c} for c in clones[entry["version"]])]
    return yaml.safe_dump(doc, sort_keys=False)


def bench_matrix(text: str) -> str:
    """The project's matrix under the bench's own repository, plus the small cells (see SMALL_PACKAGE)."""
    doc = yaml.safe_load(text)
    doc["repository"] = REPOSITORY
    return yaml.safe_dump(doc, sort_keys=False)


def small_matrix(text: str) -> str:
    doc = yaml.safe_load(text)
    doc["repository"] = f"{REPOSITORY}-small"
    tf = doc["frameworks"]["tensorflow"]
    tf["cpu_package"] = SMALL_PACKAGE
    tf["versions"] = {v: {"python": ["3.11"], "builds": {"cpu": {}}} for v in SMALL_VERSIONS}
    doc["frameworks"] = {"tensorflow": tf}
    doc["images"] = [{"framework": "tensorflow", "bases": ["debian12"], "axes": {"python": ["3.11"]}}]
    return yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------------------------------- measuring


class Bench:
    def __init__(self, work: Path, full: bool) -> None:
        import docker

        self.work = work
        self.full = full
        self.client = docker.from_env(timeout=3600)
        # Kept between runs (records of earlier builds feed the size, certify and sibling rows).
        self.state = Path(os.environ.get("BENCH_STATE", ROOT / ".builder" / "bench"))
        self.cache = Path(os.environ.get("BENCH_CACHE", work / "cache"))
        self.matrix = work / "matrix.yaml"
        self.matrix.write_text(bench_matrix((ROOT / "matrix.yaml").read_text()))
        self.small = work / "small.yaml"
        self.small.write_text(small_matrix((ROOT / "matrix.yaml").read_text()))
        ca = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
        self.ca = Path(ca).read_bytes() if ca else b""

    def cli(self, *args: str, matrix: Path | None = None, cache: Path | None = None) -> float:
        cmd = [sys.executable, "-m", "builder", "--matrix", str(matrix or self.matrix), *args]
        if args[0] in ("build", "certify"):
            cmd += ["--state", str(self.state)]
        if args[0] == "build":
            cmd += ["--cache-dir", str(cache or self.cache)]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CI": "1"})
        took = time.monotonic() - started
        if proc.returncode != 0:
            sys.exit(f"bench: `{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
        return took

    def cells(self, select: list[str], matrix: Path | None = None) -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "builder", "--matrix", str(matrix or self.matrix), "matrix",
                              *select, "--format", "json"], capture_output=True, text=True, cwd=ROOT, check=True)
        return list(json.loads(out.stdout))

    def image(self, ref: str) -> Any:
        import docker.errors

        try:
            return self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            return None

    def sibling(self, cell: dict[str, Any]) -> dict[str, Any] | None:
        """The cell's Python-only sibling in the bench matrix; where the matrix has none (the TensorFlow CPU cell
        is asked for on 3.11 alone), the bench matrix asks for one on another Python its framework version
        supports, the nearest that expands."""
        found = pick_sibling(cell, self.cells([]))
        if found is not None:
            return found
        text, claims = self.matrix.read_text(), cell["claims"]
        spec = yaml.safe_load(text)["frameworks"][claims["framework"]]["versions"][claims["version"]]
        options: dict[str, tuple[dict[str, Any], Path]] = {}
        for python in spec.get("python") or []:
            if python == claims["python"]:
                continue
            path = self.work / f"matrix-sibling-{python}.yaml"
            path.write_text(with_sibling(text, cell, python))
            try:
                rows = self.cells(["--python", python], path)
            except subprocess.CalledProcessError:  # no base serves this Python for this cell
                continue
            for row in rows:
                options[row["tag"]] = (row, path)
        found = pick_sibling(cell, [row for row, _ in options.values()])
        if found is not None:
            self.matrix.write_text(options[found["tag"]][1].read_text())
        return found

    def sibling_pair(self, cell: dict[str, Any], first: dict[str, Any], cache: Path) -> dict[str, Any] | None:
        """Build the cell's Python-only sibling through the package cache the cell's builds filled (no layer
        cache, as the cell's cold build had none) and keep both records, for this row and later default runs."""
        from builder.state import State

        sibling = self.sibling(cell)
        if sibling is None:
            return None
        self.cli("base", sibling["claims"]["base"]["name"])
        wall = self.cli("build", "--only", sibling["tag"], "--force", "--no-cache", cache=cache)
        second = {**(State(self.state).read_record(sibling["tag"]) or {}), "wall_s": round(wall, 1)}
        pair = {"first": first, "second": second}
        (self.state / SIBLING_PAIR).write_text(json.dumps(pair, indent=1) + "\n")
        return pair

    def saved_pair(self, cell: dict[str, Any]) -> dict[str, Any] | None:
        """The pair an earlier BENCH_FULL run measured for this cell, if any."""
        path = self.state / SIBLING_PAIR
        if not path.exists():
            return None
        pair: dict[str, Any] = json.loads(path.read_text())
        return pair if (pair.get("first") or {}).get("tag") == cell["tag"] else None

    def layers(self, ref: str) -> list[tuple[str, int]] | None:
        """An image's (diff id, bytes) layers; None when the image is gone."""
        image = self.image(ref)
        if image is None:
            return None
        return layer_sizes(self.client.api.history(image.id), list(image.attrs["RootFS"]["Layers"]))

    def naive_noop(self, cell: dict[str, Any]) -> float:
        """The naive recipe's no-op as a Makefile loop runs it: `docker build` (classic builder) on a cached
        image, timed around the CLI process. Without the docker CLI: the SDK's build call alone."""
        if not shutil.which("docker"):
            return self.naive_build(cell)[0]
        folder = self.work / "naive" / cell["tag"].replace("/", "_").replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Dockerfile").write_text(naive_dockerfile(cell["base"], list(cell["claims"]["requirements"])))
        (folder / "ca.pem").write_bytes(self.ca)
        tag = f"{REPOSITORY}-naive/{cell['tag'].split('/', 1)[1]}"
        started = time.monotonic()
        subprocess.run(["docker", "build", "-q", "--label", f"{NAIVE_LABEL}=true", "-t", tag, str(folder)],
                       capture_output=True, check=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
        return time.monotonic() - started

    def naive_build(self, cell: dict[str, Any], nocache: bool = False) -> tuple[float, str]:
        """Build the naive image of a cell; returns (seconds, image id). Timed around the SDK call only; its
        steps, timed as builder's own (StepClock), are kept in `naive_steps`."""
        from builder.build import StepClock

        requirements = list(cell["claims"]["requirements"])
        files = {"Dockerfile": naive_dockerfile(cell["base"], requirements).encode(), "ca.pem": self.ca}
        tag = naive_tag(cell)
        clock, partial = StepClock(), ""
        started = time.monotonic()
        image_id = ""
        for event in self.client.api.build(fileobj=io.BytesIO(context_tar(files)), custom_context=True, tag=tag,
                                           labels={NAIVE_LABEL: "true"}, rm=True, forcerm=True, pull=False,
                                           nocache=nocache, network_mode="host", decode=True):
            if "error" in event:
                sys.exit(f"bench: naive build of {cell['tag']} failed: {event['error']}")
            if "aux" in event and "ID" in event["aux"]:
                image_id = event["aux"]["ID"]
            *lines, partial = (partial + str(event.get("stream") or "")).split("\n")
            for line in lines:
                clock.see(line)
        self.naive_steps = clock.close()
        return time.monotonic() - started, image_id


def installer_row(bench: Bench, cell: dict[str, Any], image: str) -> Row:
    """pip against uv, side by side: the same wheels (downloaded once on the host) installed into a fresh venv in
    a container of `image` (the naive image: the cell's base and Python), offline, each in its own container,
    wheels read once before either so both find them in the page cache. uv is installed from PyPI into the
    bench's work folder."""
    reqs = list(cell["claims"]["requirements"])
    wheels = bench.work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "--only-binary=:all:",
                    "--python-version", cell["python"], *reqs], check=True, capture_output=True)
    uv = uv_binary(bench)
    for wheel in wheels.iterdir():
        wheel.read_bytes()
    pins = " ".join(reqs)
    commands = {  # timed: the install alone, into a venv made (with pip, as the template makes it) beforehand
        "pip": f"/tmp/v/bin/pip install -q --no-cache-dir --no-compile --no-index --find-links /w {pins}",
        "uv": f"uv pip install -q --no-cache --no-index --find-links /w --python /tmp/v/bin/python {pins}",
    }
    took: dict[str, float] = {}
    for name, command in commands.items():
        container = bench.client.containers.create(
            image, ["sh", "-c", f"python3 -m venv /tmp/v && s=$(date +%s.%N) && {command} "
                    "&& e=$(date +%s.%N) && echo \"$s $e\""],
            network_mode="none", user="0", labels={NAIVE_LABEL: "true"},
            volumes={str(wheels): {"bind": "/w", "mode": "ro"},
                     str(uv): {"bind": "/usr/local/bin/uv", "mode": "ro"}})
        try:
            container.start()
            status = container.wait(timeout=1800)
            out = container.logs().decode(errors="replace").strip().splitlines()
            if status.get("StatusCode") != 0 or not out:
                sys.exit(f"bench: {name} install in {image} failed: {out[-5:]}")
            start, end = (float(v) for v in out[-1].split())
            took[name] = end - start
        finally:
            container.remove(force=True)
    size = sum(w.stat().st_size for w in wheels.iterdir()) / 1e6
    return Row(name="installer: uv against pip (same wheels, offline, in a container)", figure=took["uv"],
               baseline=took["pip"], unit="s", target="choose with numbers", limit=None, runs="1 run",
               how="measured (the install alone, timed inside the container)",
               note=f"{len(list(wheels.iterdir()))} wheels, {size:,.0f} MB, into a fresh venv on the cell's base "
                    "and Python; neither compiles .pyc")


class _Count:
    """A write-only sink that counts (and, with `out`, hashes and passes on) what a tarball writer gives it."""

    def __init__(self, out: Any = None) -> None:
        self.out, self.n, self.sha = out, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.n += len(data)
        if self.out is not None:
            self.sha.update(data)
            self.out.write(data)
        return len(data)

    def tell(self) -> int:
        return self.n


class _Zeros:
    """Stands in for a file's bytes when only a tarball's length is wanted."""

    def read(self, n: int) -> bytes:
        return bytes(n)


def layer_tar(root: Path, top: str, out: Any = None) -> tuple[int, str]:
    """Write the folder `root` as a reproducible layer tarball whose entries are `top` and `top/...` (sorted,
    times zeroed, owner root) to `out`; returns (length, sha256 digest). With `out` None, only the length: file
    bytes are not read (the outer archive must name a member's length before its bytes)."""
    sink = _Count(out)
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT, copybufsize=4 << 20) as tar:
        paths = [root] + [Path(folder) / name for folder, dirs, files in os.walk(root) for name in dirs + files]
        paths.sort(key=lambda path: path.relative_to(root).parts)  # a folder before what it holds
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=str(Path(top) / path.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if not info.isreg():
                tar.addfile(info)
            elif out is None:
                tar.addfile(info, _Zeros())
            else:
                with path.open("rb") as data:
                    tar.addfile(info, data)
    return sink.n, f"sha256:{sink.sha.hexdigest()}"


def docker_archive(parent: dict[str, Any], layers: list[tuple[Path, str]], tag: str, out: Any) -> list[str]:
    """A `docker load` archive of `parent` (an image the engine holds, as `inspect_image` shows it) with `layers`
    on top, written to `out`; returns the new layers' diff ids. The parent's layers are named in the manifest but
    not sent: the engine skips a layer whose chain it already holds."""

    def member(name: str, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        out.write(info.tobuf(format=tarfile.PAX_FORMAT))

    def pad(size: int) -> None:
        out.write(b"\0" * (-size % tarfile.BLOCKSIZE))

    diff_ids, names = list(parent["RootFS"]["Layers"]), [f"parent/{i}.tar" for i in parent["RootFS"]["Layers"]]
    new = []
    for i, (root, top) in enumerate(layers):
        size, _ = layer_tar(root, top)
        member(f"layer{i}.tar", size)
        written, digest = layer_tar(root, top, out)
        if written != size:
            raise RuntimeError(f"{root} changed while it was archived")
        pad(size)
        new.append(digest)
        names.append(f"layer{i}.tar")
    config = json.dumps({"architecture": parent["Architecture"], "os": parent["Os"], "config": parent["Config"],
                         "rootfs": {"type": "layers", "diff_ids": diff_ids + new}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [tag], "Layers": names}]).encode()
    for name, data in (("config.json", config), ("manifest.json", manifest)):
        member(name, len(data))
        out.write(data)
        pad(len(data))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return new


def install_parent(bench: Bench, image: Any) -> str | None:
    """The classic builder's intermediate image just below a direct build's first install step: the base, the
    OS Python and the user, on which the assembled layers go."""
    history = bench.client.api.history(image.id)  # newest first; locally built steps keep their image ids
    installs = [i for i, entry in enumerate(history) if is_install_step(f"RUN {entry.get('CreatedBy', '')}")]
    if not installs or installs[-1] + 1 >= len(history):
        return None
    parent = history[installs[-1] + 1].get("Id") or ""
    return parent if parent.startswith("sha256:") else None


def uv_binary(bench: Bench) -> Path:
    """uv from PyPI, in the bench's work folder (the installer row and the assembly row run it in containers)."""
    tools = bench.work / "uv-tools"
    if not (tools / "bin" / "uv").exists():
        subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
        subprocess.run([str(tools / "bin" / "pip"), "install", "-q", "uv"], check=True, capture_output=True)
    return tools / "bin" / "uv"


def assembled_row(bench: Bench, cell: dict[str, Any], cache: Path, b_warm: float, warm_steps: list[list[Any]],
                  naive_warm: float) -> Row:
    """Daemonless assembly, measured: the warm build with its install steps replaced by (1) uv installing the
    image's own lock, offline, from the wheels in the package cache, into a host folder bind-mounted at /opt in a
    container of the image below those steps, with uv's cache in that folder (its files hardlinked, as uv links
    from its cache), (2) the CUDA and venv folders written as two reproducible layer tarballs into a `docker
    load` archive on top of that image, (3) the engine loading it through the SDK. The warm build's other steps
    are kept at their measured time. The assembled image must hold the same packages as the built one."""
    name = "warm build, install steps replaced by daemonless assembly (prototype)"
    image = bench.image(cell["tag"])
    parent = install_parent(bench, image) if image is not None else None
    if image is None or parent is None:
        return Row(name=name, figure=None, baseline=naive_warm, unit="s", target="<= 0.5", limit=0.5, runs="-",
                   how="not measured", note="the cell's image, or the step below its install steps, is gone")
    import docker.errors

    try:
        return _assembled(bench, cell, cache, b_warm, warm_steps, naive_warm, name, image, parent)
    except (docker.errors.DockerException, OSError, ValueError, LookupError) as exc:  # a prototype: say why, go on
        return Row(name=name, figure=None, baseline=naive_warm, unit="s", target="<= 0.5", limit=0.5, runs="-",
                   how="not measured", note=f"the prototype failed on this cell: {type(exc).__name__}: {exc}"[:400])


SMOKE = {"torch": "import torch; x = torch.ones(8, 8); print(torch.__version__, float((x @ x).sum()))",
         "tensorflow": "import tensorflow as tf; x = tf.ones((8, 8)); print(tf.__version__, float(tf.reduce_sum(x @ x)))"}


def assembly_script(cuda: list[str], env: list[str], site: str) -> str:
    """The assembly's install, as a container of the image below the install steps runs it (/opt the host folder,
    /w the wheels): the CUDA wheels into /opt/cuda-libs where the lock has any, the venv, its environment; it
    prints its start and end times. Whatever an earlier run left in /opt goes first, as root, inside the container
    (its files are root's: the host's user may not remove them)."""
    uv = "uv pip install -q --offline --no-index --find-links /w --cache-dir /opt/.uv-cache --no-deps"
    steps = ["rm -rf /opt/venv /opt/cuda-libs", "s=$(date +%s.%N)"]
    if cuda:
        steps.append(f"{uv} --python python3 --target /opt/cuda-libs {' '.join(cuda)}")
    steps.append("python3 -m venv /opt/venv")
    if cuda:
        steps += [f"echo /opt/cuda-libs > {site}/builder-cuda-libs.pth", f"ln -s /opt/cuda-libs/nvidia {site}/nvidia"]
    if env:
        steps.append(f"{uv} --python /opt/venv/bin/python {' '.join(env)}")
    steps += ["rm -f /opt/venv/.lock /opt/cuda-libs/.lock",
              "find /opt -path /opt/.uv-cache -prune -o -name __pycache__ -prune -exec rm -rf {} +",
              "e=$(date +%s.%N)", 'echo "$s $e"']
    return " && ".join(steps)


def _assembled(bench: Bench, cell: dict[str, Any], cache: Path, b_warm: float, warm_steps: list[list[Any]],
               naive_warm: float, name: str, image: Any, parent: str) -> Row:
    import docker.errors

    freeze = ["/opt/venv/bin/pip", "freeze", "--all"]
    lock = bench.client.containers.run(image.id, freeze, remove=True).decode().split()
    wheels, opt = bench.work / "assembly-wheels", bench.work / "assembly" / "opt"
    wheels.mkdir(parents=True, exist_ok=True)
    for path in cache.glob("*/*.whl"):  # the package cache names a file <key>-<file name>
        target = wheels / path.name.split("-", 1)[1]
        if not target.exists():
            os.link(path, target)
    cuda = [pin for pin in lock if pin.lower().startswith("nvidia-")]
    env = [pin for pin in lock if pin not in cuda and not pin.startswith(("pip==", "setuptools=="))]  # venv's own
    script = assembly_script(cuda, env, f"/opt/venv/lib/python{cell['python']}/site-packages")
    volumes = {str(opt): {"bind": "/opt", "mode": "rw"}, str(wheels): {"bind": "/w", "mode": "ro"},
               str(uv_binary(bench)): {"bind": "/usr/local/bin/uv", "mode": "ro"}}

    def in_container(command: str) -> list[str]:
        out = bench.client.containers.run(parent, ["sh", "-c", command], remove=True, user="0",
                                          network_mode="none", volumes=volumes)
        return out.decode().split()

    def install() -> float:
        out = in_container(script)
        return float(out[-1]) - float(out[-2])

    opt.mkdir(parents=True, exist_ok=True)
    try:
        from_wheels = install()  # uv's cache empty: it unzips every wheel into it (not counted: it fills once)
        installed = install()  # uv's cache full: it hardlinks
        tag, tar = f"{REPOSITORY}-assembled/{cell['tag'].split('/', 1)[1]}", bench.work / "assembled.tar"
        layers = [(opt / "cuda-libs", "opt/cuda-libs")] if cuda else []
        started = time.monotonic()
        with tar.open("wb", buffering=1 << 20) as out:
            docker_archive(bench.client.api.inspect_image(parent), [*layers, (opt / "venv", "opt/venv")], tag, out)
        archived = time.monotonic() - started
        size = tar.stat().st_size
        started = time.monotonic()
        try:
            with tar.open("rb") as data:
                bench.client.images.load(data)
        finally:
            tar.unlink()
        loaded = time.monotonic() - started
        same = bench.client.containers.run(tag, freeze, remove=True).decode().split() == lock
        framework = cell["claims"]["framework"]
        smoke = bench.client.containers.run(tag, ["/opt/venv/bin/python", "-c", SMOKE[framework]], remove=True)
        bench.client.images.remove(tag, force=True)
    finally:
        with contextlib.suppress(docker.errors.DockerException):  # the first error is the one to report
            in_container("rm -rf /opt/venv /opt/cuda-libs /opt/.uv-cache")  # root's files, removed as root
        shutil.rmtree(opt.parent, ignore_errors=True)
    steps = install_seconds(warm_steps)
    figure = b_warm - steps + installed + archived + loaded
    return Row(name=name, figure=figure if same else None, baseline=naive_warm, unit="s", target="<= 0.5",
               limit=0.5, runs="1 run", how="measured parts, summed",
               note=f"the warm build {b_warm:.1f} s less its install steps {steps:.1f} s, plus: uv from its full "
                    f"cache into the host folder {installed:.1f} s (from the wheels, filling that cache: "
                    f"{from_wheels:.1f} s, not counted), {len(layers) + 1} layer tarball(s) written {archived:.1f} s "
                    f"({size / 1e6:,.0f} MB), `images.load` {loaded:.1f} s "
                    f"({size / 1e6 / max(loaded, 1e-9):,.0f} MB/s). Same packages as the built image: "
                    f"{'yes' if same else 'NO'}; {framework} in it: {smoke.decode().strip()}")


def engine_line(version: dict[str, Any]) -> str:
    """The engine both sides build on, with the Go release it was built with: a layer commit is mostly the
    engine digesting the layer, and Go's sha256 uses the CPU's SHA instructions only from Go 1.21."""
    return f"Docker Engine {version.get('Version', '?')} (built with {version.get('GoVersion', 'Go ?')})"


def naive_tag(cell: dict[str, Any]) -> str:
    return f"{REPOSITORY}-naive/{cell['tag'].split('/', 1)[1]}"


def planning_row() -> Row:
    """Load, validate, expand and render a synthetic ~1,000-cell matrix, in-process; ms per cell."""
    from builder.matrix import expand, load_matrix
    from builder.render import render

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        path = Path(tmp, "matrix.yaml")
        path.write_text(synthetic_matrix((ROOT / "matrix.yaml").read_text(), copies=11))
        counts: list[int] = []

        def once() -> float:
            started = time.perf_counter()
            cells, _ = expand(load_matrix(str(path)))
            for cell in cells:
                render(cell)
            counts.append(len(cells))
            return (time.perf_counter() - started) * 1000 / len(cells)

        per_cell = median_of(3, once)
    return Row(name=f"planning, per cell ({counts[0]} cells)", figure=per_cell, baseline=None, unit="ms",
               target="< 5 ms", limit=5.0, runs="median of 3", how="measured (load, validate, expand, render)")


def main(select: list[str]) -> int:
    work = Path(tempfile.mkdtemp(prefix="builder-bench-"))
    try:
        return run(select, work)
    finally:
        # A BENCH_FULL run leaves 6.5 GB here (wheels, package caches, layer tarballs): three runs' worth left
        # the next one's prototype load without space. What cannot go (files a container wrote as another
        # user) is named.
        try:
            shutil.rmtree(work)
        except OSError as exc:
            print(f"bench: could not remove all of {work} ({exc}): remove it by hand", file=sys.stderr)


def run(select: list[str], work: Path) -> int:
    full = os.environ.get("BENCH_FULL") == "1"
    select = select or DEFAULT_SELECT
    load_at_start, started = os.getloadavg(), time.monotonic()
    rows: list[Row] = [planning_row()]
    print(f"planning: {rows[0].figure:.2f} ms per cell", file=sys.stderr)
    # builder as installed: pip byte-compiles a package it installs. Without this, a machine that sets
    # PYTHONDONTWRITEBYTECODE (these do) compiles cli.py and uptodate.py again in every no-op, about 12 ms.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "builder")], capture_output=True, check=True)
    bench = Bench(work, full)
    bench.cli("base", "debian12")
    cells = bench.cells(select)
    one = [cells[0]]
    sel1 = ["--only", one[0]["tag"]]
    record: dict[str, Any] = {}
    if os.environ.get("BENCH_ONLY") == "sibling":
        return sibling_only(bench, one[0])
    pair = None

    if full:  # cold: empty package cache and no layer cache on either side; warm: the cache full, no layer cache
        cold = work / "cold-cache"
        from builder.state import State

        b_cold = bench.cli("build", *sel1, "--force", "--no-cache", cache=cold)
        first = {**(State(bench.state).read_record(one[0]["tag"]) or {}), "wall_s": round(b_cold, 1)}
        cold_steps = first.get("steps") or []
        n_cold, _ = bench.naive_build(one[0], nocache=True)
        naive_cold_steps = bench.naive_steps
        b_warm = bench.cli("build", *sel1, "--force", "--no-cache", cache=cold)
        warm_steps = (State(bench.state).read_record(one[0]["tag"]) or {}).get("steps") or []
        n_warm, _ = bench.naive_build(one[0], nocache=True)
        shared = shared_row(cold, first.get("fetched_files") or {}, first.get("lock") or [], warm_steps,
                            bench.naive_steps, n_warm)
        rows += [
            Row(name="cold build, 1 cell", figure=b_cold, baseline=n_cold, unit="s", target="<= 1.0", limit=1.0,
                runs="1 run", how="measured", note=f"where builder's time went: {decomposition(cold_steps)}; "
                f"the naive recipe's: {decomposition(naive_cold_steps)}"),
            Row(name="warm build (package cache full, no layer cache)", figure=b_warm, baseline=n_warm, unit="s",
                target="<= 0.5", limit=0.5, runs="1 run", how="measured",
                note="the naive recipe has no package cache: its warm build downloads everything again; where "
                     f"builder's time went: {decomposition(warm_steps)}; the naive recipe's: "
                     f"{decomposition(bench.naive_steps)}. {commit_share(warm_steps, bench.naive_steps)}. "
                     + (f"What any classic build of this image pays in this run (next row, an estimate): "
                        f"{shared.figure:.0f} s, {shared.ratio:.2f} of the naive build" if shared.ratio is not None
                        else "")),
            shared,
        ]
        rows.append(assembled_row(bench, one[0], cold, b_warm, warm_steps, n_warm))
        pair = bench.sibling_pair(one[0], first, cold)  # after the warm build: the cache holds the cell's files
    # What a no-op needs: the cell built on both sides (not timed).
    bench.cli("build", *sel1)
    _, naive_id = bench.naive_build(one[0])
    # The builds just written GBs the kernel is still writing back: flushed first, so that neither side's no-op
    # waits on that disk traffic (a run without it timed the naive no-op 20% slower and builder's 90% slower).
    os.sync()
    b_noop, n_noop = medians_interleaved(3, lambda: bench.cli("build", *sel1), lambda: bench.naive_noop(one[0]))
    rows.append(Row(name="no-op rebuild, 1 cell", figure=b_noop, baseline=n_noop, unit="s", target="<= 1.0",
                    limit=1.0, runs="median of 3, in turns", how="measured",
                    note="builder: `python -m builder build` as a new process; naive: `docker build` (classic "
                         "builder) as a new process, as a Makefile loop runs it"))

    small = bench.cells([], bench.small)
    bench.cli("build", "-j", "2", matrix=bench.small)
    for cell in small:
        bench.naive_build(cell)
    os.sync()
    b_noop10, n_noop10 = medians_interleaved(3, lambda: bench.cli("build", matrix=bench.small),
                                             lambda: sum(bench.naive_noop(c) for c in small))
    rows.append(Row(name=f"no-op rebuild, {len(small)} small cells", figure=b_noop10, baseline=n_noop10, unit="s",
                    target="<= 0.2", limit=0.2, runs="median of 3, in turns", how="measured",
                    note=f"{len(small)} cells of a bench matrix where `{SMALL_PACKAGE}` stands in for the framework "
                         "(ten 1.5-5 GB cells do not fit this 2-core machine's time; the no-op path reads labels, "
                         "not image bytes)"))

    # j2 vs j1: two small cells rebuilt with --force --no-cache, every step run again (a direct build's steps
    # name no port or path of the host, so --force alone would find each of them in the layer cache).
    two = ["--only", small[0]["tag"], "--only", small[1]["tag"]]
    use1, use2 = Usage(), Usage()
    use1.start()
    j1 = bench.cli("build", *two, "--force", "--no-cache", matrix=bench.small)
    use1.stop()
    use2.start()
    j2 = bench.cli("build", *two, "--force", "--no-cache", "-j", "2", matrix=bench.small)
    use2.stop()
    rows.append(Row(name="-j2 against -j1, 2 small cells (--force --no-cache)", figure=j2, baseline=j1, unit="s",
                    target="<= 0.75", limit=0.75, runs="1 run", how="measured (/proc: CPU, disk, network)",
                    note=f"-j1: {use1.text()}; -j2: {use2.text()}. The machine's whole load counts (other "
                         "processes too), so a busy CPU here is this build's or a neighbour's"))

    # Size against its floor and against the naive image.
    from builder.state import State

    record = State(bench.state).read_record(one[0]["tag"]) or {}
    image = bench.image(one[0]["tag"])
    if image is not None:
        floor = floor_bytes(bench.client.api.history(image.id))
        naive = bench.client.images.get(naive_id)
        size = int(image.attrs["Size"])
        rows += [
            Row(name="image size against its floor", figure=size / 1e6, baseline=floor / 1e6, unit="MB",
                target="<= 1.10", limit=1.10, runs="1 run", how="measured (`docker history`: base, Python, "
                "installed environment)"),
            Row(name="image size against the naive image", figure=size / 1e6,
                baseline=int(naive.attrs["Size"]) / 1e6, unit="MB", target="<= 1.0", limit=1.0, runs="1 run",
                how="measured"),
        ]
        rows.append(nvidia_cuda_row(bench, one[0], size, int(naive.attrs["Size"])))
    # Certify: time per image, and its share of the cell's build time (the record's).
    c_time = median_of(3, lambda: bench.cli("certify", *sel1, "--force", "--gpus", "none"))
    build_s = float(record.get("seconds") or 0) or None
    rows.append(Row(name="certify, per image (CPU)", figure=c_time, baseline=build_s, unit="s", target="share",
                    limit=None, runs="median of 3", how="measured; baseline: that image's build time from its record",
                    note="ratio = certify time / build time" if build_s else "no build record of this image in the "
                    "bench state (it was built earlier): run with BENCH_FULL=1 for the share"))
    pair = pair or bench.saved_pair(one[0])
    rows += sibling_rows(pair, registry_bytes(bench, pair),
                         "" if pair or not full else "the matrix has no cell that differs from this one only in Python",
                         functools.cache(pypi_requires_python))
    if full:
        rows.append(installer_row(bench, one[0], naive_tag(one[0])))

    engine = engine_line(bench.client.version())
    header = (f"# Benchmark: builder against the naive recipe\n\nMeasured {time.strftime('%Y-%m-%d')} on "
              f"{os.cpu_count()} cores with {engine} by `make bench`{' (BENCH_FULL=1)' if full else ''}; cell "
              f"`{one[0]['tag']}`. Ratio = builder / naive (lower is better).\n\nThe machine's load average "
              f"(1 min) was {load_at_start[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end of this "
              f"{(time.monotonic() - started) / 60:.0f}-minute run: other work shares these cores, which is why "
              "every figure is a ratio measured in the same run. What the misses come from and what would close "
              "them: [bench-notes.md](bench-notes.md).")
    out = os.environ.get("BENCH_OUT", "bench")  # e.g. BENCH_OUT=bench-torch beside the default cell's table
    (DOCS / f"{out}.md").write_text(markdown(rows, header))
    (DOCS / f"{out}.json").write_text(json.dumps({"select": select, "full": full, "cell": one[0]["tag"],
                                                  "engine": engine, "rows": [
        {**asdict(r), "ratio": r.ratio, "met": r.met} for r in rows]}, indent=2) + "\n")
    print(markdown(rows, header))
    cleanup(bench, [one[0]["tag"]])
    return 0


def sibling_only(bench: Bench, cell: dict[str, Any]) -> int:
    """BENCH_ONLY=sibling: the sibling rows alone, printed (docs/ untouched): the cell's cold build into an empty
    package cache, then its Python-only sibling through that cache."""
    from builder.state import State

    cache = bench.work / "cold-cache"
    wall = bench.cli("build", "--only", cell["tag"], "--force", "--no-cache", cache=cache)
    first = {**(State(bench.state).read_record(cell["tag"]) or {}), "wall_s": round(wall, 1)}
    pair = bench.sibling_pair(cell, first, cache)
    rows = sibling_rows(pair, registry_bytes(bench, pair), "the matrix has no cell that differs from this one "
                        "only in Python", functools.cache(pypi_requires_python))
    print(markdown(rows, f"# Python-only sibling of `{cell['tag']}` (BENCH_ONLY=sibling)"))
    return 0


def nvidia_cuda_row(bench: Bench, cell: dict[str, Any], size: int, naive_size: int) -> Row:
    """The naive image on the nvidia/cuda base it would use, computed (that base cannot be pulled here)."""
    tag = nvidia_cuda_runtime(yaml.safe_load((ROOT / "matrix.yaml").read_text()), cell["claims"].get("cuda"))
    published = NVIDIA_CUDA_PUBLISHED.get(tag or "")
    own_base = bench.image(cell["base"])
    name = f"image size against the naive image on {tag or 'nvidia/cuda'}"
    if tag is None or published is None or own_base is None:
        why = ("a CPU cell: its naive recipe has no nvidia/cuda base" if tag is None else
               f"no published size of {tag} in NVIDIA_CUDA_PUBLISHED" if published is None else
               f"the cell's base {cell['base']} is not on this engine")
        return Row(name=name, figure=None, baseline=None, unit="MB", target="<= 1.0", limit=1.0, runs="-",
                   how="not computed", note=why)
    own = int(own_base.attrs["Size"])
    computed = naive_on_published_base(naive_size, own, int(published["bytes"]))
    return Row(name=name, figure=size / 1e6, baseline=computed / 1e6, unit="MB", target="<= 1.0", limit=1.0,
               runs="1 run", how="computed: the published base + this run's measured naive layers",
               note=f"{tag}: {published['bytes'] / 1e6:,.0f} MB in {published['layers']} layers (published: "
                    f"{published['source']}) + the naive image's own layers above {cell['base']} "
                    f"({(naive_size - own) / 1e6:,.0f} MB, measured); builder's image measured")


def _listed(files: dict[str, int]) -> str:
    if not files:
        return "none"
    return (", ".join(f"{n} ({f'{s / 1e6:,.1f} MB' if s >= 100_000 else f'{s / 1e3:,.0f} kB'})"
                      for n, s in sorted(files.items())) + f"; {sum(files.values()) / 1e6:,.0f} MB in all")


def _base(record: dict[str, Any]) -> str:
    return f"`{((record.get('cell') or {}).get('base') or {}).get('image', '?')}`"


def sibling_rows(pair: dict[str, Any] | None, layers: tuple[int, int] | None, why: str = "",
                 requires_python: Callable[[str], str | None] = lambda name: None) -> list[Row]:
    """The Python-only sibling's rows from the two build records (`first`: the cell's cold build, `second`: the
    sibling's, through the package cache the first filled) and (unique, summed) layer bytes of their images."""
    name = "Python-only sibling"
    if pair is None:
        return [Row(name=f"{name}, bytes fetched", figure=None, baseline=None, unit="MB",
                    target="only cp-tagged wheels again", limit=None, runs="-", how="not measured",
                    note=why or "no sibling pair in the bench state: run with BENCH_FULL=1")]
    first, second = pair["first"], pair["second"]
    again = twice_fetched(first.get("fetched_files") or {}, second.get("fetched_files") or {},
                          (second.get("cell") or {}).get("python"), requires_python)
    files = sum(sum(part.values()) for part in (again.cp, again.same, again.versions, again.python, again.debs,
                                                 again.new))
    was = {project_of(n): n for n in first.get("fetched_files") or {}}
    versions = {f"{n} (the first: {was[project_of(n)]})": s for n, s in again.versions.items()}
    for_python = {f"{n} (the first: {was[project_of(n)]}, Requires-Python {requires_python(was[project_of(n)])})": s
                  for n, s in again.python.items()}
    rows = [
        Row(name=f"{name}, bytes fetched", figure=second["upstream_bytes"] / 1e6,
            baseline=first["upstream_bytes"] / 1e6, unit="MB", target="only cp-tagged wheels again", limit=None,
            runs="1 run", how="measured: the two builds' records (the proxy's per-file counts)", verdict=again.met,
            note=f"`{second['tag']}` (built {second.get('created', '?')}) after `{first['tag']}` (a cold build), "
                 "through the package cache the first filled. Fetched again, cp-tagged (expected): "
                 f"{_listed(again.cp)}. Another version of a pure wheel whose first version does not install on "
                 f"this Python (expected): {_listed(for_python)}. The same file again (the cache missed): "
                 f"{_listed(again.same)}. Another version of a wheel that is not cp-tagged, though the first's "
                 f"would install here (this Python's resolution differs): {_listed(versions)}. "
                 f"Another release's .debs of the first's apt packages (not counted: the base comes with the "
                 f"Python): {_listed(again.debs)}. New to the sibling (projects the first never fetched): "
                 f"{_listed(again.new)}. The other "
                 f"{(second['upstream_bytes'] - files) / 1e6:,.1f} MB are index pages, fetched fresh by every build"),
        Row(name=f"{name}, build time", figure=second.get("wall_s") or second.get("seconds"),
            baseline=first.get("wall_s") or first.get("seconds"), unit="s", target="report", limit=None,
            runs="1 run", how="measured (`build` as a new process, no layer cache on either)",
            note="the sibling's build against the cell's cold build; it downloads only what the list above names"),
    ]
    if layers is None:
        rows.append(Row(name=f"{name}, registry-level", figure=None, baseline=None, unit="MB", target="report",
                        limit=None, runs="-", how="not measured", note="one of the two images is gone"))
    else:
        unique, total = layers
        rows.append(Row(name=f"{name}, registry-level", figure=unique / 1e6, baseline=total / 1e6, unit="MB",
                        target="report", limit=None, runs="1 run",
                        how="measured (`docker history` sizes by RootFS diff id)",
                        note="the two images' distinct layers, a layer shared by diff id counted once, against the "
                             f"sum of their sizes; {(total - unique) / 1e6:,.1f} MB shared. Bases: "
                             f"{_base(first)} and {_base(second)} (a diff id hashes a layer's content: on another "
                             "base and Python, the base, OS Python, user and venv layers all differ)"))
    return rows


def registry_bytes(bench: Bench, pair: dict[str, Any] | None) -> tuple[int, int] | None:
    if pair is None:
        return None
    # By tag: the images as they stand now (a later warm build of the first replaces its cold-built image).
    first, second = bench.layers(pair["first"]["tag"]), bench.layers(pair["second"]["tag"])
    return None if first is None or second is None else unique_layer_bytes(first, second)


def cleanup(bench: Bench, keep: list[str]) -> None:
    """Remove the bench's own images: the small cells on both sides always; the selected cell's (bench/ and
    bench-naive/) only with BENCH_CLEAN=1, so that the next default run needs no cold build on either side."""
    if os.environ.get("BENCH_CLEAN") == "1":
        keep = []
    for image in bench.client.images.list(filters={"label": NAIVE_LABEL}):
        if not any(f"{REPOSITORY}-naive/{t.split('/', 1)[1]}" in image.tags for t in keep):
            bench.client.images.remove(str(image.id), force=True)
    subprocess.run([sys.executable, "-m", "builder", "--matrix", str(bench.small), "clean"], cwd=ROOT,
                   capture_output=True)
    if not keep:
        subprocess.run([sys.executable, "-m", "builder", "--matrix", str(bench.matrix), "clean", "--only",
                        "*"], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
