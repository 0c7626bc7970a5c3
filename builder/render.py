"""Render a cell into a build context (Dockerfile, requirements, claims) and hash it.

The content hash is computed here and nowhere else: from every rendered file and the base reference.
Build-time sources (sources/) are not part of it: they change where an image is built, not what it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from builder import assets, labels, models, tags
from builder.errors import UsageError
from builder.matrix.model import Cell, Model, printable

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = assets.TEMPLATES  # the source tree's templates/, or the copy an installed wheel ships
SMOKE = Path(__file__).resolve().parent / "smoke"
UID = 10001
SOURCES_DIR = "sources"
# The package proxy's name inside a direct build: the same on every host (never resolved: the build reaches
# the proxy through http_proxy), so the Dockerfile says nothing of where the proxy or the indexes are.
PACKAGES_HOST = "packages.builder.invalid"
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
    f"{SOURCES_DIR}/uv.toml": b'[pip]\nindex-strategy = "unsafe-best-match"\n',
}


# Marks a directory as one `render --out` wrote, so a later render may replace it as a whole.
RENDER_MARK = ".builder-render"


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    cell: Cell
    files: dict[str, bytes]  # path inside the context -> content; sources/ and model layers excluded
    content_hash: str
    # The model layers the context needs (path inside the context -> model): `build` fetches and adds them. Each
    # path names the model's sha256 in the Dockerfile, so the content hash covers the model without its bytes.
    models: dict[str, Model] = field(default_factory=dict)
    # The Dockerfile of a direct build (no builder stage: installed from the build's package proxy), when the
    # cell's installer can make one; `files` keep the builder-stage form, which a plain `docker build` can use.
    direct: bytes | None = None

    def build_files(self, proxied: bool) -> dict[str, bytes]:
        """The files to build from: the direct Dockerfile when the package proxy serves the build."""
        if proxied and self.direct is not None:
            return {**self.files, "Dockerfile": self.direct}
        return self.files

    @property
    def dir_name(self) -> str:
        """The context's directory name: its tag as a safe file name."""
        return tags.file_name(self.cell.tag)

    def write(self, out: Path) -> Path:
        """Write the context, with default sources, under out/<tag as a directory name>."""
        target = out / self.dir_name
        for rel, data in {**self.files, **DEFAULT_SOURCES}.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return target


def check_out(text: str) -> Path:
    """The `render --out` directory, checked before anything is written. Raises UsageError.

    It must be a new directory in a writable one, an empty directory, or one an earlier render wrote
    (which write_contexts replaces whole, so no stale file of an old context is left for `docker build`).
    """
    if not text.strip():
        raise UsageError("--out: give a directory to write the contexts into")
    shown = printable(text, 200)
    out = Path(text)
    if out.is_symlink():
        what = "a dangling symbolic link" if not out.exists() else "a symbolic link"
        raise UsageError(f"--out {shown}: is {what}; give a real directory")
    if os.path.lexists(out):
        if not out.is_dir():
            raise UsageError(f"--out {shown}: exists and is not a directory")
        if next(out.iterdir(), None) is not None and not (out / RENDER_MARK).is_file():
            raise UsageError(f"--out {shown}: holds files that `render` did not write; give a new or empty "
                             "directory")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--out {shown}: its parent {printable(str(parent), 200)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {shown}: cannot write in {printable(str(parent), 200)} (permission denied)")
    return out


def write_contexts(contexts: list[BuildContext], out: Path) -> dict[str, Path]:
    """Write every context under `out` (checked by check_out), replacing what an earlier render left there.

    All of it is written into a temporary directory beside `out` first, then moved into place with renames:
    a failure part-way leaves `out` as it was, never half-written. Returns tag -> context directory.
    """
    parent = out.absolute().parent
    tmp: Path | None = None
    trash: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        (tmp / RENDER_MARK).write_text("written by `python -m builder render`; replaced whole by the next one\n")
        paths = {}
        for context in contexts:
            context.write(tmp)
            paths[context.cell.tag] = out / context.dir_name
        if os.path.lexists(out):
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, trash / "out")
        os.replace(tmp, out)
    except OSError as exc:
        if trash is not None and not os.path.lexists(out) and os.path.lexists(trash / "out"):
            os.replace(trash / "out", out)  # put the old contexts back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"--out {printable(str(out), 200)}: cannot write the contexts: "
                         f"{exc.strerror or exc}") from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return paths


@functools.cache
def _environment() -> jinja2.Environment:
    """One environment per process: it compiles each template once (a new one per cell cost ~40 ms a cell)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def dockerfile(cell: Cell, *, direct: bool = False) -> str:
    """The cell's Dockerfile. `direct`: installed in the final stage from the build's package proxy (needs uv
    and the proxy); else in a builder stage whose environment is copied over (a plain `docker build` too)."""
    lib_path = ""
    if cell.framework == "tensorflow" and cell.cuda_source == "wheels":
        lib_path = ":".join(f"{CUDA_LIBS}/{d}/lib" for d in NVIDIA_LIB_DIRS)
    python_exe = "python3" if cell.python_source == "system" else f"python{cell.python}"
    # A devel cell's toolkit from wheels: the compiler merges into the runtime's nvidia/cuXX tree (CUDA_HOME).
    cuda_home = f"{CUDA_LIBS}/cu{cell.cuda.split('.')[0]}" if cell.toolchain and cell.cuda else ""
    python_dev = "python3-dev" if cell.python_source == "system" else f"python{cell.python}-dev"
    text = _environment().get_template("Dockerfile.j2").render(
        cell=cell, uid=UID, labels=labels.image_labels(cell), managed_label=labels.MANAGED,
        library_path=lib_path, cuda_home=cuda_home,
        python_dev=python_dev, python_exe=python_exe, cuda_libs=CUDA_LIBS,
        cuda_libs_dir=CUDA_LIBS.rsplit("/", 1)[0],
        site_packages=f"/opt/venv/lib/python{cell.python}/site-packages",
        models=[{"name": m.name, "hub": m.hub, "url": m.url, "sha256": m.sha256, "context": models.context_path(m),
                 "path": models.image_path(m)} for m in cell.models],
        model_env=models.environment(cell.models),
        direct=direct, tools="/tmp/builder-tools", uv="/tmp/builder-tools/uv/bin/uv",
        packages=f"http://{PACKAGES_HOST}", packages_host=PACKAGES_HOST,
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
    if cell.installer:
        files["installer.txt"] = (cell.installer + "\n").encode()
    if cell.toolchain:
        files["requirements-devel.txt"] = ("\n".join(cell.toolchain) + "\n").encode()
    direct = dockerfile(cell, direct=True).encode() if cell.installer else None
    # The hash covers both forms, so that a change to either rebuilds, whichever form built the image.
    hashed = {**files, "Dockerfile.direct": direct} if direct else files
    return BuildContext(cell=cell, files=files, content_hash=content_hash(hashed, base_id or cell.base.image),
                        models={models.context_path(m): m for m in cell.models}, direct=direct)
