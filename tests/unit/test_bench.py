"""The bench's own code, without builds: its matrices, the naive recipe, the floor, the verdicts and the table."""

from __future__ import annotations

from pathlib import Path

from builder.matrix import expand, load_matrix
from tests import bench

ROOT = Path(__file__).resolve().parents[2]


def test_small_matrix_has_ten_tiny_cells(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(bench.small_matrix((ROOT / "matrix.yaml").read_text()))
    cells, _ = expand(load_matrix(str(path)))
    assert len(cells) == 10
    assert {c.requirements for c in cells} == {(f"six=={v}",) for v in bench.SMALL_VERSIONS}
    assert all(c.tag.startswith("bench-small/") for c in cells)


def test_synthetic_matrix_is_about_a_thousand_valid_cells(tmp_path: Path) -> None:
    path = tmp_path / "synthetic.yaml"
    path.write_text(bench.synthetic_matrix((ROOT / "matrix.yaml").read_text(), copies=11))
    real, _ = expand(load_matrix(str(ROOT / "matrix.yaml")))
    cells, _ = expand(load_matrix(str(path)))
    assert len(cells) == 12 * len(real)
    assert len({c.tag for c in cells}) == len(cells)


def test_naive_recipe_is_single_stage_with_the_pins_and_the_ca_bundle() -> None:
    text = bench.naive_dockerfile("debian:bookworm-slim", ["torch==2.4.1"])
    assert text.count("FROM ") == 1 and text.startswith("FROM debian:bookworm-slim\n")
    assert "pip install --no-cache-dir torch==2.4.1" in text
    assert "COPY ca.pem" in text and "PIP_CERT=" in text


def test_floor_counts_base_python_and_environment_layers_only() -> None:
    history = [
        {"CreatedBy": "/bin/sh -c #(nop)  LABEL org.builder.tag=x", "Size": 0},
        {"CreatedBy": "/bin/sh -c #(nop) COPY file:abc in /opt/builder/cell.json", "Size": 7},  # the claims
        {"CreatedBy": "/bin/sh -c useradd --uid 10001 --user-group --create-home app", "Size": 9},
        {"CreatedBy": "/bin/sh -c #(nop) COPY dir:93c2ea30 in /opt/venv", "Size": 1000},  # the builder stage's venv
        {"CreatedBy": "/bin/sh -c apt-get update && apt-get install -y python3 python3-venv", "Size": 100},
        {"CreatedBy": "", "Size": 50},  # an imported base has no CreatedBy
    ]
    assert bench.floor_bytes(history) == 1150


def test_only_cp_tagged_wheels_count_as_expected_refetches() -> None:
    second = {"torch-2.4.1-cp39-cp39-manylinux1_x86_64.whl": 800, "triton-3.0.0-1-cp39-cp39-manylinux.whl": 200,
              "nvidia_cudnn_cu12-9.1.0.70-py3-none-manylinux2014_x86_64.whl": 600}
    cp, other = bench.twice_fetched({}, second)
    assert set(cp) == {"torch-2.4.1-cp39-cp39-manylinux1_x86_64.whl", "triton-3.0.0-1-cp39-cp39-manylinux.whl"}
    assert other == {"nvidia_cudnn_cu12-9.1.0.70-py3-none-manylinux2014_x86_64.whl": 600}


def test_rows_compare_the_ratio_or_the_figure_with_the_target() -> None:
    noop = bench.Row(name="no-op", figure=0.3, baseline=0.1, unit="s", target="<= 1.0", limit=1.0,
                     runs="median of 3", how="measured")
    plan = bench.Row(name="plan", figure=1.7, baseline=None, unit="ms", target="< 5 ms", limit=5.0,
                     runs="median of 3", how="measured")
    unknown = bench.Row(name="sibling", figure=None, baseline=None, unit="MB", target="-", limit=None, runs="-",
                        how="not measured", note="no records")
    assert noop.ratio is not None and round(noop.ratio, 6) == 3.0 and noop.met is False
    assert plan.ratio is None and plan.met is True
    assert unknown.met is None
    table = bench.markdown([noop, plan, unknown], "# Bench")
    assert "| no-op | 0.3 s | 0.1 s | 3.00 | <= 1.0 | **no** | median of 3 | measured |" in table
    assert "| plan | 1.7 ms | - | - | < 5 ms | yes |" in table
    assert "- **sibling**: no records" in table


def test_the_naive_recipes_nvidia_cuda_base_follows_the_matrix() -> None:
    import yaml

    doc = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    assert bench.nvidia_cuda_runtime(doc, "12.1") == "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04"
    assert bench.nvidia_cuda_runtime(doc, None) is None  # a CPU cell has no nvidia/cuda base
    assert bench.nvidia_cuda_runtime(doc, "cpu") is None
    # The torch bench cell's base has a published size; each entry names its source.
    assert "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04" in bench.NVIDIA_CUDA_PUBLISHED
    assert all(e["bytes"] > 10**9 and e["source"] for e in bench.NVIDIA_CUDA_PUBLISHED.values())


def test_the_naive_size_on_a_published_base_swaps_the_base_only() -> None:
    # 5,466 MB naive image on a 106 MB Debian base: 5,360 MB of its own layers, on the 3,380 MB CUDA base.
    assert bench.naive_on_published_base(5_466_000_000, 106_000_000, 3_379_534_165) == 8_739_534_165


def test_usage_reads_cpu_disk_and_network_from_proc() -> None:
    usage = bench.Usage()
    usage.start()
    sum(i * i for i in range(300_000))  # some CPU
    usage.stop()
    assert usage.seconds > 0 and usage.cpu_s > 0
    assert usage.disk_mb >= 0 and usage.net_mb >= 0
    assert usage.text().startswith("CPU ") and "cores busy, disk " in usage.text()


def test_a_builds_time_is_split_by_what_its_steps_do() -> None:
    steps = [[1, "FROM debian:bookworm-slim AS os", 0.0],
             [4, "RUN apt-get update  && apt-get install -y python3", 15.0],
             [8, "RUN python3 -m venv /opt/venv  && PIP_CONFIG_FILE=... pip install", 45.0],
             [11, "COPY --from=builder /opt/builder-export/ /", 10.0],
             [12, "COPY --from=builder /opt/builder-venv/ /", 25.0],
             [19, "LABEL org.builder.hash=abc", 5.0]]
    assert bench.decomposition(steps) == ("OS Python (apt) 15 s (15%), install step (fetch, pip, commit) 45 s (45%), "
                                          "COPY --from=builder (copy, commit) 35 s (35%), other steps 5 s (5%)")
