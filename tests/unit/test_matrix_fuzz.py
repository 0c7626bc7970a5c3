"""A seeded mutation fuzz of matrix.yaml: whatever the file holds, loading and expanding it ends in cells or in
MatrixError lines that are each one clean line naming the file; never a traceback, never a hang."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

from builder.errors import MatrixError
from builder.matrix import expand, load_matrix
from builder.render import render

from .conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]
BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
HOSTILE = [
    "\x00", "\x1b[2J", "\n", "\r", "\t", "\u2028", "\ufeff", "\u0663", "\uff12", "\U0001d7d8", ":", ": ", "- ", "[", "]",
    "{", "}", "{}", "[{}]", "&a ", "*a", "<<: ", "!x ", "!!binary ", "!!python/object:os.system ", "? ", "|", ">",
    "'", '"', "#", "%YAML 1.2\n", "---\n", "...\n", "~", "true", "1.0", "0x1F", "9" * 5000, "x" * 300, "1e999",
    "2001-13-45", "$(id)", "`id`", "{{ 7*7 }}", "{% raw %}", "\\", "/", "..", "\xe9", "\U0001f600", "  ", "@",
]
BUDGET_S = 4.0


def mutate(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    kind = rng.randrange(8)
    i = rng.randrange(len(lines))
    if kind == 0:
        del lines[i]
    elif kind == 1:
        lines.insert(i, lines[rng.randrange(len(lines))])
    elif kind == 2:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == 3:
        lines[i] = " " * rng.randrange(8) + lines[i].lstrip()
    elif kind == 4:
        return text[: rng.randrange(len(text) + 1)]
    else:
        line = lines[i]
        at = rng.randrange(len(line) + 1)
        cut = rng.randrange(4) if kind == 5 else 0
        lines[i] = line[:at] + rng.choice(HOSTILE) + line[at + cut:]
    return "\n".join(lines)


def check_one(path: Path, text: str) -> str:
    """'ok' or 'error' for a clean outcome; raises AssertionError for anything else."""
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        cells, _ = expand(load_matrix(path))
    except MatrixError as exc:
        lines = exc.lines()
        assert lines, text
        for line in lines:
            assert line.startswith(f"{path}"), line
            assert not BAD_CHARS.search(line) and len(line) < 600, line
        return "error"
    for cell in cells[:3]:
        render(cell)
    return "ok"


def test_mutated_matrices_never_trace_back(tmp_path):
    rng = random.Random(20240611)
    seeds = [(ROOT / "matrix.yaml").read_text(), SMALL]
    outcomes = {"ok": 0, "error": 0}
    tracebacks: list[str] = []
    path = tmp_path / "m.yaml"
    deadline = time.monotonic() + BUDGET_S
    cases = 0
    while time.monotonic() < deadline:
        text = rng.choice(seeds)
        for _ in range(rng.randrange(1, 4)):
            text = mutate(text, rng)
        cases += 1
        start = time.monotonic()
        try:
            outcomes[check_one(path, text)] += 1
        except AssertionError:
            raise
        except Exception as exc:  # the defect this test exists to find
            tracebacks.append(f"{type(exc).__name__}: {exc!s:.200} <- {text[:0]}")
        assert time.monotonic() - start < 10, "a case took over 10 s (a hang?)"
    print(f"fuzz: {cases} cases, {outcomes['ok']} loaded, {outcomes['error']} clean errors, "
          f"{len(tracebacks)} tracebacks")
    assert cases > 10
    assert not tracebacks, tracebacks[:5]
