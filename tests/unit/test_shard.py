"""`matrix --shard K/N`: every cell in exactly one shard, balanced by expected cost, the same every time."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from builder import shard
from builder.cli import main
from builder.errors import UsageError
from builder.matrix import Cell, expand, load_matrix
from builder.state import State

MATRIX = Path(__file__).resolve().parents[2] / "matrix.yaml"


@pytest.fixture(scope="module")
def cells() -> list[Cell]:
    found, _ = expand(load_matrix(str(MATRIX)))
    assert len(found) > 20  # the shipped matrix: the case CI fans out
    return found


def loads(parts: list[list[Cell]], state: State | None = None) -> list[float]:
    every = [c for part in parts for c in part]
    costs = shard.expected(every, state)
    return [sum(costs[c.tag].cost for c in part) for part in parts]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 200])
def test_every_cell_in_exactly_one_shard(cells: list[Cell], n: int) -> None:
    parts = shard.partition(cells, n)
    assert len(parts) == n
    tags = [c.tag for part in parts for c in part]
    assert sorted(tags) == sorted(c.tag for c in cells)
    assert len(tags) == len(set(tags))


def test_same_shards_whatever_the_order(cells: list[Cell]) -> None:
    want = [[c.tag for c in part] for part in shard.partition(cells, 4)]
    shuffled = list(cells)
    random.Random(7).shuffle(shuffled)
    assert [[c.tag for c in part] for part in shard.partition(shuffled, 4)] == want


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_longest_processing_time_bound(cells: list[Cell], n: int) -> None:
    """Graham's bound: LPT is within 4/3 of the best possible, which is at least max(total/N, dearest cell)."""
    parts = shard.partition(cells, n)
    costs = shard.expected(cells, None)
    best_possible = max(sum(c.cost for c in costs.values()) / n, max(c.cost for c in costs.values()))
    assert max(loads(parts)) <= (4 / 3) * best_possible
    # and better than cutting the matrix into N runs of cells in its own order (all torch cells first)
    size = -(-len(cells) // n)
    naive = [cells[i * size:(i + 1) * size] for i in range(n)]
    assert max(loads(parts)) - min(loads(parts)) < max(loads(naive)) - min(loads(naive))


def test_estimates_by_framework_cuda_and_flavor(cells: list[Cell]) -> None:
    by_tag = {c.tag: c for c in cells}
    torch_cuda = shard.estimate(by_tag["builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12"])
    torch_devel = shard.estimate(by_tag["builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.12-devel-cuda-devel-ubuntu22.04"])
    tf_cpu = shard.estimate(by_tag["builder/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"])
    tf_cuda = shard.estimate(by_tag["builder/tensorflow:2.18.0-cuda12.5-cudnn9.3-py3.11-runtime-debian12"])
    assert torch_cuda.size == int(5.5e9) and tf_cuda.size == int(5.2e9) and tf_cpu.size == int(1.5e9)
    assert torch_devel.size > torch_cuda.size and torch_devel.build_s > torch_cuda.build_s
    assert torch_devel.certify_s > torch_cuda.certify_s  # compile.torch and the extension build: 216 s against 52
    wheel_devel = next(c for c in cells if c.flavor == "devel" and c.toolchain)  # CUDA 13: nvcc from wheels
    runtime = next(c for c in cells if c.flavor == "runtime" and c.framework == wheel_devel.framework
                   and c.version == wheel_devel.version and c.cuda == wheel_devel.cuda
                   and c.python == wheel_devel.python and c.base.name == wheel_devel.base.name)
    extra = shard.estimate(wheel_devel).size - shard.estimate(runtime).size
    assert extra == 630_000_000 and "5,612" in shard.estimate(wheel_devel).source  # measured, not the +4 GB base
    assert all(f.source for f in (torch_cuda, torch_devel, tf_cpu, tf_cuda))


def test_records_of_an_earlier_run_win_over_estimates(cells: list[Cell], tmp_path: Path) -> None:
    """A cell measured at 10 hours must get a runner to itself; its estimate alone would not."""
    state = State(tmp_path / "state")
    slow = "builder/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
    state.write_record(slow, {"tag": slow, "seconds": 36_000.0, "size": 1_519_897_806, "upstream_bytes": 56_850_557})
    state.write_certificate(slow, {"image": {"tag": slow}, "level": "cpu-verified", "run": {"seconds": 34.4}})
    costs = shard.expected(cells, state)
    assert costs[slow].source == "records"
    assert costs[slow].seconds == pytest.approx(36_034.4) and costs[slow].size == 1_519_897_806
    assert all(e.source == "estimate" for t, e in costs.items() if t != slow)

    with_records = shard.partition(cells, 4, state)
    alone = next(part for part in with_records if any(c.tag == slow for c in part))
    assert [c.tag for c in alone] == [slow]
    without = shard.partition(cells, 4)
    assert len(next(part for part in without if any(c.tag == slow for c in part))) > 1


def test_a_record_without_a_time_keeps_the_estimate_for_it(cells: list[Cell], tmp_path: Path) -> None:
    state = State(tmp_path / "state")
    tag = cells[0].tag
    state.write_record(tag, {"tag": tag, "seconds": 0.0, "size": 2_000_000_000})
    got = shard.expected(cells[:1], state)[tag]
    assert got.source == "records+estimate"
    assert got.size == 2_000_000_000
    guess = shard.estimate(cells[0])
    assert got.seconds == guess.build_s + guess.certify_s


@pytest.mark.parametrize("text,want", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 4/4 ", (4, 4))])
def test_parse_shard(text: str, want: tuple[int, int]) -> None:
    assert shard.parse_shard(text) == want


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "0/0", "a/b", "2", "2/4/1", "-1/4", "1/-4", ""])
def test_bad_shard_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        shard.parse_shard(text)


@pytest.mark.parametrize("text", ["0/4", "5/4", "x"])
def test_cli_bad_shard_is_one_line_exit_2(text: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["--matrix", str(MATRIX), "matrix", "--format", "github", "--shard", text,
                 "--state", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: --shard") and "Traceback" not in err[0]


def test_cli_shards_cover_the_matrix(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                    tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="builder")
    assert main(["--matrix", str(MATRIX), "matrix", "--format", "github", "--framework", "tensorflow"]) == 0
    whole = json.loads(capsys.readouterr().out)["include"]
    seen: list[dict[str, str]] = []
    for k in (1, 2, 3):
        assert main(["--matrix", str(MATRIX), "matrix", "--format", "github", "--framework", "tensorflow",
                     "--shard", f"{k}/3", "--state", str(tmp_path / "none")]) == 0
        part = json.loads(capsys.readouterr().out)["include"]
        assert part, f"shard {k}/3 is empty"
        assert f"shard {k}/3: {len(part)} cell(s)" in caplog.text
        seen += part
    assert sorted(seen, key=lambda c: c["tag"]) == sorted(whole, key=lambda c: c["tag"])
    assert not (tmp_path / "none").exists()  # planning reads the state; it never creates one
