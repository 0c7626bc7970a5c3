"""Split the cells over N CI runners so that each runner's share takes about as long.

A cell's cost is what a runner spends on it: its build time, its CPU certification time, and the time
to move its image (push, and the pulls of later jobs), all in seconds. Figures come from an earlier
run's build records and certificates (matched by tag) where they exist, else from ESTIMATES. The cells
are then dealt with the longest-processing-time rule (Graham, 1969): the costliest cell first, each to
the runner with the least work so far; ties go to the lower shard number, then by tag, so the same
inputs always give the same shards.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

from builder.errors import UsageError
from builder.matrix import Cell
from builder.state import State

GB = 1_000_000_000
# Moving an image costs about size / this: the ~50 MB/s downloads measured on the machines this project
# is built on (and pushes of the same order to a registry near the runners).
TRANSFER_BYTES_PER_S = 50_000_000


@dataclass(frozen=True, kw_only=True)
class Figure:
    """What one kind of cell is expected to cost, and where that number comes from."""

    size: int  # bytes of the final image
    build_s: float
    certify_s: float
    source: str


# Per framework, CUDA (wheels) or CPU, on a 2-core runner with an empty package cache.
ESTIMATES: dict[tuple[str, bool], Figure] = {
    ("torch", True): Figure(size=int(5.5 * GB), build_s=330, certify_s=52, source=(
        "torch 2.4.1 / CUDA 12.1: 5.46-5.62 GB; cold builds 166 s (docs/bench.json), 206 s and 453 s on 2 cores; "
        "CPU certify 52 s")),
    ("tensorflow", True): Figure(size=int(5.2 * GB), build_s=183, certify_s=35, source=(
        "tensorflow[and-cuda] 2.18.0: 5.17 GB, cold build 183 s; certify as for the CPU cell")),
    ("tensorflow", False): Figure(size=int(1.5 * GB), build_s=310, certify_s=35, source=(
        "tensorflow-cpu 2.18.0: 1.52 GB, build 310 s on 2 cores; payload with promises 34 s")),
    ("torch", False): Figure(size=int(1.0 * GB), build_s=150, certify_s=30, source=(
        "torch CPU: not measured here (the PyTorch CPU index is unreachable from these machines); "
        "a ~200 MB wheel on a 0.4 GB OS+Python base, so about 1 GB and half a CUDA build")),
}
# What a devel cell adds to its runtime cell. With the compiler from NVIDIA's wheels (the CUDA 13 line) it was
# measured; the CUDA 12 line starts from an nvidia/cuda devel image, which can't be pulled here to measure.
DEVEL_FROM_WHEELS = Figure(size=630_000_000, build_s=90, certify_s=164, source=(
    "devel toolchain from wheels, torch 2.11.0 / CUDA 13.0: +630 MB (5,612 against 4,982 MB), certify 216 s "
    "against about 52 s for the runtime image (compile.torch and a CUDA extension build); build about +90 s"))
DEVEL_FROM_BASE = Figure(size=4 * GB, build_s=60, certify_s=164, source=(
    "nvidia/cuda devel base: about +4 GB and a pull (not measured here); certify as for the CUDA 13 devel cell"))
# A framework with no figure of its own costs what the dearest known one does: better over than under.
UNKNOWN = max(ESTIMATES.values(), key=lambda f: f.build_s + f.certify_s + f.size / TRANSFER_BYTES_PER_S)


@dataclass(frozen=True, kw_only=True)
class Expected:
    """One cell's expected cost, with where its figures came from."""

    tag: str
    size: int
    seconds: float  # build + certify
    source: str  # "records" (an earlier run), "estimate" or "records+estimate"

    @property
    def cost(self) -> float:
        """Seconds of a runner's time: work plus moving the image."""
        return self.seconds + self.size / TRANSFER_BYTES_PER_S


def estimate(cell: Cell) -> Figure:
    base = ESTIMATES.get((cell.framework, cell.cuda is not None), UNKNOWN)
    if cell.flavor != "devel":
        return base
    extra = DEVEL_FROM_WHEELS if cell.toolchain else DEVEL_FROM_BASE
    return Figure(size=base.size + extra.size, build_s=base.build_s + extra.build_s,
                  certify_s=base.certify_s + extra.certify_s, source=f"{base.source}; {extra.source}")


def _positive(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def expected(cells: list[Cell], state: State | None) -> dict[str, Expected]:
    """Each cell's expected cost: measured figures from `state` where it has them, else the estimate."""
    records = {str(r.get("tag")): r for r in state.records()} if state is not None else {}
    out = {}
    for cell in cells:
        guess = estimate(cell)
        record = records.get(cell.tag) or {}
        certificate = (state.read_certificate(cell.tag) if state is not None and record else None) or {}
        size = _positive(record.get("size"))
        build_s = _positive(record.get("seconds"))
        certify_s = _positive((certificate.get("run") or {}).get("seconds"))
        measured = [v is not None for v in (size, build_s, certify_s)]
        source = "records" if all(measured) else "records+estimate" if any(measured) else "estimate"
        out[cell.tag] = Expected(
            tag=cell.tag, size=int(size if size is not None else guess.size),
            seconds=(build_s if build_s is not None else guess.build_s)
            + (certify_s if certify_s is not None else guess.certify_s),
            source=source)
    return out


def partition(cells: list[Cell], shards: int, state: State | None = None) -> list[list[Cell]]:
    """Deal `cells` into `shards` lists, longest-processing-time first; every cell lands in exactly one."""
    if shards < 1:
        raise ValueError("shards must be 1 or more")
    costs = expected(cells, state)
    order = sorted(cells, key=lambda c: (-costs[c.tag].cost, c.tag))
    heap = [(0.0, i) for i in range(shards)]  # (load so far, shard index): the least loaded, lowest index first
    out: list[list[Cell]] = [[] for _ in range(shards)]
    for cell in order:
        load, i = heapq.heappop(heap)
        out[i].append(cell)
        heapq.heappush(heap, (load + costs[cell.tag].cost, i))
    return out


SHARD = re.compile(r"([0-9]{1,4})/([0-9]{1,4})")


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N), 1 <= K <= N; anything else is a usage error that says what to write."""
    match = SHARD.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"--shard {text!r}: write K/N, shard K of N, for example --shard 2/4")
    k, n = int(match[1]), int(match[2])
    if n < 1 or not 1 <= k <= n:
        raise UsageError(f"--shard {text}: K must be between 1 and N, and N at least 1 (for example 2/4)")
    return k, n
