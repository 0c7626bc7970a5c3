"""The wheel carries everything builder needs at run time: the templates (kept in the top-level templates/)
render from an installed copy, with no checkout beside it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RENDER = """
import json, sys
import builder
from builder import assets
from builder.matrix import Selection, expand, load_matrix
from builder.render import render
cells, _ = expand(load_matrix(sys.argv[1]), Selection(only=("builder/torch:2.4.1-cpu-py3.11-runtime-debian12",)))
print(json.dumps({"builder": builder.__file__, "templates": str(assets.TEMPLATES),
                  "dockerfile": render(cells[0]).files["Dockerfile"].decode()}))
"""


def test_wheel_ships_templates_and_renders_from_an_installed_copy(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("builder-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"builder/templates/{p.relative_to(ROOT / 'templates')}" for p in (ROOT / "templates").rglob("*.j2")}
    assert "builder/templates/Dockerfile.j2" in templates
    assert templates <= names, sorted(templates - names)
    # Every module of the package is in it (the package list in pyproject.toml is written out by hand).
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "builder").rglob("*.py")}
    assert modules <= names, sorted(modules - names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    proc = subprocess.run([sys.executable, "-c", RENDER, str(ROOT / "matrix.yaml")], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["builder"].startswith(str(site)), out["builder"]  # the installed copy, not the checkout
    assert out["templates"] == str(site / "builder" / "templates")
    assert (ROOT / "tests" / "golden" / "torch-2.4.1-cpu-py3.11.Dockerfile").read_text() == out["dockerfile"]
