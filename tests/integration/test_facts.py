"""`facts` against the real index: the matrix agrees with torch's metadata, and a wrong fact is caught."""

from __future__ import annotations

from .conftest import ROOT


def test_matrix_agrees_with_torch_metadata(work):
    proc = work.cli("facts", "--framework", "torch==2.4.1", matrix=ROOT / "matrix.yaml")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if " cudnn " in line)
    assert row.split()[:6] == ["torch==2.4.1", "12.1", "cudnn", "9.1.0.70", "9.1.0.70", "ok"]


def test_wrong_cudnn_fact_is_caught_with_its_line(work, tmp_path):
    text = (ROOT / "matrix.yaml").read_text()
    wrong = text.replace('"12.1": {cudnn: "9.1.0.70"}', '"12.1": {cudnn: "9.1.0.71"}', 1)
    path = tmp_path / "m.yaml"
    path.write_text(wrong)
    line = wrong.splitlines().index('          "12.1": {cudnn: "9.1.0.71"}') + 1
    proc = work.cli("facts", "--framework", "torch==2.4.1", matrix=path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {path}:{line}: torch 2.4.1 cudnn: matrix says 9.1.0.71, the index's "
                                   "metadata says 9.1.0.70")
