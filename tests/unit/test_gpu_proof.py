"""docs/gpu-proof.sh, run on this CPU host: with no GPU it must fail, and its negative control must hold."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from .golden import PROOF_CELLS, ROOT, proof_cells

torch = pytest.importorskip("torch")


def test_committed_cells_are_the_matrix_torch_cells():
    assert PROOF_CELLS.read_text() == proof_cells(), "run `make golden` after changing matrix.yaml"


def test_without_a_gpu_the_proof_fails_and_says_why(tmp_path):
    # A cell that matches this host's torch exactly, so the run gets as far as the payload.
    py = ".".join(platform.python_version().split(".")[:2])
    claims = json.loads(PROOF_CELLS.read_text())[0]
    claims.update(version=torch.__version__.split("+")[0], cuda=torch.version.cuda, python=py, flavor="runtime",
                  cudnn=None, tag="test/torch:host")
    cells = tmp_path / "cells.json"
    cells.write_text(json.dumps([claims]))
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "docs" / "gpu-proof.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "PROOF_CELLS": str(cells), "PROOF_STEPS": "30"},
                          timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((out / "gpu-proof.json").read_text())
    assert report["verdict"] == "failed" and report["cell"] == "test/torch:host"
    assert report["runs"]["gpu"]["level"] == "failed"
    assert any(r.startswith("gpu.visible") for r in report["runs"]["gpu"]["reasons"])
    hidden = report["runs"]["gpu-hidden"]
    assert hidden["level"] == "failed"
    assert not [c for c in hidden["checks"] if c["name"].startswith("gpu.") and c["status"] == "pass"]
    assert "gpu-proof: FAILED" in done.stdout


def test_a_host_that_matches_no_cell_fails_before_running(tmp_path):
    cells = tmp_path / "cells.json"
    cells.write_text("[]")
    done = subprocess.run(["bash", str(ROOT / "docs" / "gpu-proof.sh"), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "PROOF_CELLS": str(cells)}, timeout=300)
    assert done.returncode == 1
    assert "cannot vouch for any cell" in done.stdout
    assert json.loads((tmp_path / "gpu-proof.json").read_text())["runs"] == {}
