"""The command line, through main(argv): output formats, selectors, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from builder.cli import main

ROOT = Path(__file__).resolve().parents[2]
MATRIX = str(ROOT / "matrix.yaml")


def test_matrix_json_lists_cells_with_claims(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 30
    row = next(r for r in rows if r["tag"] == "builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12")
    assert row["cuda"] == "12.1" and row["cudnn"] == "9.1.0.70" and row["python"] == "3.11"
    assert row["framework"] == "torch==2.4.1" and row["flavor"] == "runtime"
    assert any(r["framework"].startswith("tensorflow==") for r in rows)


def test_cuda_selector_keeps_only_that_cuda(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--cuda", "12.1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["cuda"] for r in rows} == {"12.1"}


def test_framework_version_selector(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "torch==2.4.1", "--python", "3.11", "--format",
                 "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["framework"] == "torch==2.4.1" and r["python"] == "3.11" for r in rows)


def test_github_format_is_a_strategy_matrix(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "tensorflow", "--format", "github"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"include"} and data["include"]
    assert set(data["include"][0]) == {"tag", "framework", "version", "cuda", "python", "flavor", "base"}


def test_table_and_explain(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "torch==2.1.2", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["TAG", "BASE", "PYTHON", "CUDA", "CUDNN", "FRAMEWORK", "FLAVOR"]
    assert "torch==2.1.2 cuda12.1 py3.12 runtime: torch 2.1.2 publishes no cp312 wheel" in out
    assert "[rule python-wheels; fact at" in out


def test_render_writes_contexts(tmp_path, capsys):
    assert main(["--matrix", MATRIX, "render", "--cuda", "12.1", "--python", "3.11", "--out", str(tmp_path)]) == 0
    dockerfiles = list(tmp_path.glob("*/Dockerfile"))
    assert dockerfiles and len(dockerfiles) == len(capsys.readouterr().out.splitlines())
    for path in dockerfiles:
        # the payload is not in the context (certify brings it), so a new check changes no image
        assert (path.parent / "cell.json").is_file() and not (path.parent / "smoke").exists()


def test_explicit_impossible_combination_is_one_line_error(tmp_path, capsys):
    text = (ROOT / "matrix.yaml").read_text() + (
        "  - framework: torch\n    bases: [debian13]\n    include:\n"
        '      - {version: "2.1.2", cuda: "12.1", python: "3.12"}\n'
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["--matrix", str(path), "matrix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = text.count("\n")
    fact = text.splitlines().index('      "2.1.2":') + 2  # its python: line, 1-based
    assert err == [f"{path}:{line}: images[5].include[0]: impossible combination torch==2.1.2 cuda12.1 py3.12 "
                   "runtime: torch 2.1.2 publishes no cp312 wheel (wheels exist for Python 3.8, 3.9, 3.10, 3.11) "
                   f"[rule python-wheels; fact at {path}:{fact}]"]


def test_unknown_framework_and_empty_selection_are_errors(capsys):
    assert main(["--matrix", MATRIX, "render", "--framework", "jax", "--out", "/tmp/x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --framework jax: unknown framework (use torch or tensorflow)"
    assert main(["--matrix", MATRIX, "render", "--python", "2.7", "--out", "/tmp/x"]) == 2
    assert "no cell matches the selectors" in capsys.readouterr().err


def test_engine_unreachable_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert main(["--matrix", MATRIX, "build", "--only", "*torch:2.4.1-cpu-*"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no Docker engine answers at unix:///nonexistent/docker.sock")
    assert "DOCKER_HOST" in err[0]
