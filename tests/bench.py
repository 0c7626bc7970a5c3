"""`make bench`: build, up-to-date and certify figures for a selection, against the project's targets.

Targets live here, not in timed tests. Writes docs/bench.json and prints one line per figure.
    python -m tests.bench --framework torch==2.4.1 --cuda 12.1 --python 3.11
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# figure -> (target, unit); a figure above its target is reported as missed
TARGETS = {
    "cold_build_s": (300.0, "s"),
    "up_to_date_s": (10.0, "s"),
    "image_size_gb": (6.0, "GB"),
    "certify_s": (60.0, "s"),
}


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench: `builder {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - started, proc


def main(select: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="builder-bench-") as tmp:
        state, cache = f"{tmp}/state", f"{tmp}/cache"
        cold, _ = cli("build", *select, "--force", "--state", state, "--cache-dir", cache)
        warm, _ = cli("build", *select, "--state", state, "--cache-dir", cache)
        certify, _ = cli("certify", *select, "--state", state)
        records = [json.loads(p.read_text()) for p in Path(state, "records").glob("*.json")]
    figures = {
        "cold_build_s": round(cold, 1),
        "up_to_date_s": round(warm, 1),
        "image_size_gb": round(max(r["size"] for r in records) / 1e9, 2),
        "certify_s": round(certify, 1),
        "fetched_gb": round(sum(r["upstream_bytes"] for r in records) / 1e9, 2),
        "cells": [r["tag"] for r in records],
    }
    missed = 0
    for name, (target, unit) in TARGETS.items():
        ok = figures[name] <= target  # type: ignore[operator]
        missed += not ok
        print(f"{name:15} {figures[name]:>8} {unit:3} target <= {target:g} {unit}  {'ok' if ok else 'MISSED'}")
    out = ROOT / "docs" / "bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"select": select, "figures": figures, "targets": TARGETS}, indent=2) + "\n")
    print(f"written to {out}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
