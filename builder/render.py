"""Render a cell into a build context (Dockerfile, requirements, claims) and hash it.

The content hash is computed here and nowhere else: from every rendered file and the base reference.
Build-time sources (sources/) are not part of it: they change where an image is built, not what it is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2

from builder.matrix.model import Cell

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
SMOKE = Path(__file__).resolve().parent / "smoke"
UID = 10001
SOURCES_DIR = "sources"
# The pip nvidia-* wheels' files, moved out of site-packages (a symlink stays) into a layer of their own.
CUDA_LIBS = "/opt/cuda-libs/nvidia"
# Where TensorFlow's pip CUDA libraries land inside nvidia/ (TF does not add them to its own search path).
NVIDIA_LIB_DIRS = (
    "cublas", "cuda_cupti", "cuda_nvcc", "cuda_nvrtc", "cuda_runtime", "cudnn", "cufft", "curand",
    "cusolver", "cusparse", "nccl", "nvjitlink",
)
# What a rendered context's sources/ holds until `build` puts the host's real sources there:
# with these, `docker build` of a rendered context installs straight from the default index.
DEFAULT_SOURCES = {
    f"{SOURCES_DIR}/pip.conf": b"[global]\n",
}


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    cell: Cell
    files: dict[str, bytes]  # path inside the context -> content; sources/ excluded
    content_hash: str

    def write(self, out: Path) -> Path:
        """Write the context, with default sources, under out/<tag as a directory name>."""
        target = out / self.cell.tag.replace("/", "_").replace(":", "_")
        for rel, data in {**self.files, **DEFAULT_SOURCES}.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return target


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def dockerfile(cell: Cell) -> str:
    lib_path = ""
    if cell.framework == "tensorflow" and cell.cuda_source == "wheels":
        lib_path = ":".join(f"{CUDA_LIBS}/{d}/lib" for d in NVIDIA_LIB_DIRS)
    python_exe = "python3" if cell.python_source == "system" else f"python{cell.python}"
    text = _environment().get_template("Dockerfile.j2").render(
        cell=cell, uid=UID, library_path=lib_path, python_exe=python_exe, cuda_libs=CUDA_LIBS,
        cuda_libs_dir=CUDA_LIBS.rsplit("/", 1)[0],
        site_packages=f"/opt/venv/lib/python{cell.python}/site-packages",
    )
    # Collapse the blank runs that skipped partials leave behind.
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def content_hash(files: dict[str, bytes], base: str) -> str:
    digest = hashlib.sha256()
    digest.update(b"base\0" + base.encode() + b"\0")
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).hexdigest().encode() + b"\0")
    return digest.hexdigest()


def render(cell: Cell, base_id: str | None = None) -> BuildContext:
    """The cell's build context. Its hash covers the base: the image id the engine holds (`base_id`) when
    building, so a base that moved under the same tag is not up to date; the reference when no engine
    is involved (`render`, lint). The smoke payload is not in the context: certify brings it.
    """
    files: dict[str, bytes] = {
        "Dockerfile": dockerfile(cell).encode(),
        "requirements.txt": ("\n".join(cell.requirements) + "\n").encode(),
        "cell.json": (json.dumps(cell.claims(), indent=2, sort_keys=True) + "\n").encode(),
    }
    return BuildContext(cell=cell, files=files, content_hash=content_hash(files, base_id or cell.base.image))
