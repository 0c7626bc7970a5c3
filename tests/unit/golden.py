"""Golden Dockerfiles: a handful of cells of the default matrix, rendered. `make golden` refreshes them."""

from __future__ import annotations

import json
from pathlib import Path

from builder.matrix import Cell, Selection, expand, load_matrix
from builder.render import dockerfile

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
PROOF_CELLS = ROOT / "docs" / "gpu-proof-cells.json"
# name -> the tag glob that picks exactly one cell
CELLS = {
    "torch-2.4.1-cuda12.1-py3.11": "builder/torch:2.4.1-cuda12.1-*-py3.11-runtime-debian12",
    "torch-2.4.1-cpu-py3.11": "builder/torch:2.4.1-cpu-py3.11-runtime-debian12",
    "torch-2.4.1-cuda12.1-py3.12-devel-deadsnakes": "builder/torch:2.4.1-cuda12.1-*-py3.12-devel-*",
    "tensorflow-2.18.0-cuda12.5-py3.11": "builder/tensorflow:2.18.0-cuda12.5-*-py3.11-runtime-debian12",
    "tensorflow-2.15.0-system-cuda": "builder/tensorflow:2.15.0-cuda12.2-*-py3.10-*",
    "tensorflow-2.15.0-system-cuda-py3.11-deadsnakes": "builder/tensorflow:2.15.0-cuda12.2-*-py3.11-*",
    "tensorflow-2.18.0-cpu-py3.11": "builder/tensorflow:2.18.0-cpu-py3.11-*",
    "torch-2.11.0-cuda13.0-py3.11-devel-wheels": "builder/torch:2.11.0-cuda13.0-*-py3.11-devel-debian12",
}


def cell(name: str) -> Cell:
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"), Selection(only=(CELLS[name],)))
    assert len(cells) == 1, (name, [c.tag for c in cells])
    return cells[0]


def proof_cells() -> str:
    """The claims of every torch cell, for docs/gpu-proof.sh on a GPU host where builder's dependencies are missing."""
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"), Selection(framework="torch"))
    return json.dumps([c.claims() for c in cells if c.cuda], indent=1, sort_keys=True) + "\n"


def main() -> None:
    for name in CELLS:
        for path, direct in ((GOLDEN / f"{name}.Dockerfile", False), (GOLDEN / f"{name}.direct.Dockerfile", True)):
            path.write_text(dockerfile(cell(name), direct=direct))
            print(path)
    PROOF_CELLS.write_text(proof_cells())
    print(PROOF_CELLS)


if __name__ == "__main__":
    main()
