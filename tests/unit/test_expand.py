"""Axes expansion, include/exclude, base choice, selectors, and the default matrix's coverage."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.matrix import Selection, expand, load_matrix

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default():
    return expand(load_matrix(ROOT / "matrix.yaml"))


def test_small_matrix_expands_axes_and_includes(write_matrix):
    cells, dropped = expand(load_matrix(write_matrix()))
    tags = sorted(c.tag for c in cells)
    assert "example/ml/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12" in tags
    assert "example/ml/torch:2.1.2-cuda12.1-cudnn8.9-py3.9-runtime-debian11" in tags
    assert "example/ml/tensorflow:2.18.0-cuda12.5-cudnn9.3-py3.11-runtime-debian12" in tags
    assert "example/ml/torch:2.4.1-cpu-py3.11-runtime-debian12" in tags
    assert "example/ml/torch:2.4.1-cuda12.1-cudnn9.1-py3.10-devel-cuda-devel" in tags
    # axes: python 3.12 has no base here, 2.1.2 has no cp312 wheel: dropped with reasons, not errors
    reasons = {f"{r.combo}": r.violation.rule for r in dropped}
    assert reasons["torch==2.1.2 cuda12.1 py3.12 runtime"] == "python-wheels"
    assert reasons["torch==2.4.1 cuda12.1 py3.12 runtime"] == "base"
    assert len(cells) == 8


def test_exclude_removes_matching_combinations(write_matrix):
    from .conftest import SMALL

    text = SMALL.replace('      python: ["3.9", "3.11", "3.12"]\n',
                         '      python: ["3.9", "3.11", "3.12"]\n    exclude:\n      - {cuda: cpu}\n      - {version: "2.1.2", python: "3.9"}\n')
    tags = {c.tag for c in expand(load_matrix(write_matrix(text)))[0]}
    assert not any("-cpu-" in t for t in tags)
    assert not any(":2.1.2-" in t and "py3.9" in t for t in tags)
    assert any(":2.1.2-" in t and "py3.11" in t for t in tags)


def test_devel_cells_use_the_nvidia_devel_image_of_their_cuda(write_matrix):
    cells, _ = expand(load_matrix(write_matrix()), Selection(flavor="devel"))
    assert [c.base.image for c in cells] == ["nvidia/cuda:12.1.1-devel-ubuntu22.04"]


def test_system_python_beats_an_extra_python_source(default):
    cells, _ = default
    cell = next(c for c in cells if c.tag.startswith("builder/torch:2.4.1-cuda12.1-") and c.python == "3.11"
                and c.flavor == "runtime")
    assert cell.base.name == "debian12" and cell.python_source == "system"


@pytest.mark.parametrize(("sel", "check"), [
    (Selection(cuda="12.1"), lambda c: c.cuda == "12.1"),
    (Selection(cuda="cpu"), lambda c: c.cuda is None),
    (Selection(python="3.11"), lambda c: c.python == "3.11"),
    (Selection(framework="tensorflow"), lambda c: c.framework == "tensorflow"),
    (Selection(framework="torch", framework_version="2.4.1"), lambda c: c.version == "2.4.1"),
    (Selection(flavor="devel"), lambda c: c.flavor == "devel"),
    (Selection(only=("*tensorflow:2.18.0-*",)), lambda c: c.framework == "tensorflow" and c.version == "2.18.0"),
])
def test_selectors_keep_only_matching_cells(default, sel, check):
    everything, _ = default
    chosen, _ = expand(load_matrix(ROOT / "matrix.yaml"), sel)
    assert chosen and all(check(c) for c in chosen)
    assert len(chosen) == sum(1 for c in everything if check(c))


def test_only_globs_are_ored():
    sel = Selection(only=("*torch:2.4.1-cuda12.1-*py3.11-runtime*", "*tensorflow:2.18.0-cpu-*"))
    chosen, _ = expand(load_matrix(ROOT / "matrix.yaml"), sel)
    assert len(chosen) == 2


def test_default_matrix_covers_what_it_promises(default):
    cells, _ = default
    assert len(cells) >= 30
    torch = {c.version for c in cells if c.framework == "torch"}
    assert {"2.1.2", "2.2.2", "2.3.1", "2.4.1", "2.5.1", "2.6.0", "2.7.1", "2.8.0", "2.9.1"} <= torch
    assert any(c.cuda == "13.0" for c in cells)
    tf = {c.version for c in cells if c.framework == "tensorflow"}
    assert {"2.15.0", "2.16.1", "2.17.0", "2.18.0", "2.19.0", "2.20.0"} <= tf
    assert {c.cuda for c in cells} >= {"11.8", "12.1", "13.0", None}
    assert {c.python for c in cells} >= {"3.9", "3.10", "3.11", "3.12", "3.13"}
    assert any(c.flavor == "devel" for c in cells) and any(c.cuda is None for c in cells)


def test_unverified_facts_reach_the_cell(default):
    cells, _ = default
    cell = next(c for c in cells if c.tag.startswith("builder/torch:2.4.1-cuda11.8-"))
    assert "torch 2.4.1 11.8: cudnn" in cell.unverified


def test_tensorflow_cells_install_its_cuda_extra_and_pins(default):
    cells, _ = default
    tf220 = next(c for c in cells if c.framework == "tensorflow" and c.version == "2.20.0")
    assert tf220.requirements[0] == "tensorflow[and-cuda]==2.20.0"
    assert "nvidia-cudnn-cu12==9.3.0.75" in tf220.requirements
    tf215 = next(c for c in cells if c.framework == "tensorflow" and c.version == "2.15.0")
    assert tf215.cuda_source == "system" and tf215.base.image == "nvidia/cuda:12.2.2-cudnn8-runtime-ubuntu22.04"
    cpu = next(c for c in cells if c.framework == "tensorflow" and c.cuda is None)
    assert cpu.requirements == ("tensorflow-cpu==2.18.0",)


def test_tensorflow_215_is_served_on_every_python_it_supports(default):
    cells, _ = default
    tf215 = {c.python: c for c in cells if c.framework == "tensorflow" and c.version == "2.15.0" and c.cuda}
    assert set(tf215) == {"3.9", "3.10", "3.11"}
    assert tf215["3.10"].python_source == "system"
    assert tf215["3.9"].python_source == tf215["3.11"].python_source == "deadsnakes"
    assert all(c.base.name == "cuda-runtime-ubuntu22.04" for c in tf215.values())


def test_a_missing_python_source_points_at_python_sources(tmp_path):
    text = (ROOT / "matrix.yaml").read_text()
    text = text.replace("bases: [ubuntu22.04, cuda-devel-ubuntu22.04, cuda-runtime-ubuntu22.04]",
                        "bases: [ubuntu22.04, cuda-devel-ubuntu22.04]")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    _, dropped = expand(load_matrix(path), Selection(framework="tensorflow", framework_version="2.15.0"))
    (rejection,) = [r for r in dropped if r.combo.python == "3.9" and r.combo.cuda == "12.2"]
    line = text.splitlines().index("    bases: [ubuntu22.04, cuda-devel-ubuntu22.04]") + 1
    assert rejection.violation.rule == "base"
    assert rejection.violation.where == f"{path}:{line}", rejection
    assert "no python_sources entry adds 3.9" in str(rejection)


def test_only_filters_the_dropped_combinations_too():
    sel = Selection(only=("*tensorflow:2.16.1-*",))
    _, dropped = expand(load_matrix(ROOT / "matrix.yaml"), sel)
    assert dropped and all(r.combo.framework == "tensorflow" and r.combo.version == "2.16.1" for r in dropped)


def test_repeated_selectors_are_ored():
    chosen, _ = expand(load_matrix(ROOT / "matrix.yaml"), Selection(python=("3.10", "3.12"), framework=(
        "torch==2.4.1", "tensorflow==2.18.0")))
    assert chosen and {c.python for c in chosen} == {"3.10", "3.12"}
    assert {(c.framework, c.version) for c in chosen} == {("torch", "2.4.1"), ("tensorflow", "2.18.0")}
