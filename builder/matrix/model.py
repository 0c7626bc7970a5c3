"""The typed values that leave the matrix stage: resolved bases and cells.

A cell's tag is composed by builder.tags and nowhere else.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from builder import tags
from builder.matrix.schema import MatrixFile


@dataclass(frozen=True, kw_only=True)
class Bootstrap:
    suite: str
    mirror: str


@dataclass(frozen=True, kw_only=True)
class Base:
    """A base image as one cell uses it: nvidia/cuda bases are resolved against the cell's CUDA."""

    name: str
    image: str
    python: str
    bootstrap: Bootstrap | None = None
    cuda: str | None = None  # set for nvidia/cuda bases: the CUDA the image ships
    cudnn_major: str | None = None  # set for nvidia/cuda bases that ship cuDNN
    flavor: str | None = None  # runtime or devel, for nvidia/cuda bases
    family: str = "debian"  # debian or ubuntu: which apt sources a Python source needs


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One image the matrix asks for, with everything it claims."""

    repository: str
    framework: str
    version: str
    cuda: str | None  # None: a CPU-only cell
    cudnn: str | None
    python: str
    flavor: str
    base: Base
    python_source: str  # "system" or the name of a python_sources entry
    cuda_source: str  # "wheels", "system" or "none"
    index: str | None  # primary package index URL; None means the configured default (PyPI)
    requirements: tuple[str, ...]
    driver_ga: str | None
    driver_floor: str | None
    unverified: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def cuda_label(self) -> str:
        return f"cuda{self.cuda}" if self.cuda else "cpu"

    @property
    def cudnn_short(self) -> str | None:
        return ".".join(self.cudnn.split(".")[:2]) if self.cudnn else None

    @property
    def image_repository(self) -> str:
        return tags.cell_repository(self.repository, self.framework)

    @property
    def image_tag(self) -> str:
        return tags.cell_tag(version=self.version, cuda=self.cuda, cudnn=self.cudnn, python=self.python,
                             flavor=self.flavor, base=self.base.name)

    @property
    def tag(self) -> str:
        """The full reference, `repository/framework:tag` (composed in builder.tags)."""
        return f"{self.image_repository}:{self.image_tag}"

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.framework, self.version, self.cuda or "cpu", self.python, self.flavor, self.base.name)

    def claims(self) -> dict[str, Any]:
        """What the cell claims, as recorded in cell.json and checked inside the image."""
        data = asdict(self)
        data["tag"] = self.tag
        return data


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The selectors every command takes; all given ones must match (globs in `only` are OR'ed)."""

    cuda: str | None = None
    python: str | None = None
    framework: str | None = None
    framework_version: str | None = None
    flavor: str | None = None
    only: tuple[str, ...] = ()

    def matches(self, cell: Cell) -> bool:
        return self.matches_fields(framework=cell.framework, version=cell.version, cuda=cell.cuda or "cpu",
                                   python=cell.python, flavor=cell.flavor, tag=cell.tag)

    def matches_fields(
        self, *, framework: str, version: str, cuda: str, python: str, flavor: str, tag: str | None
    ) -> bool:
        """Match by fields; a combination that never became a cell has no tag, and `only` lets it pass."""
        checks = [
            self.cuda is None or cuda == self.cuda,
            self.python is None or python == self.python,
            self.framework is None or framework == self.framework,
            self.framework_version is None or version == self.framework_version,
            self.flavor is None or flavor == self.flavor,
            not self.only or tag is None or any(fnmatch.fnmatchcase(tag, g) for g in self.only),
        ]
        return all(checks)


@dataclass(frozen=True, kw_only=True)
class Matrix:
    """A validated matrix file, with the line of every key for messages that point at facts."""

    path: str
    spec: MatrixFile
    lines: dict[tuple[Any, ...], int]

    def where(self, path: tuple[Any, ...]) -> str:
        """`file:line` of the nearest key on `path` that the file has."""
        for i in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:i]))
            if line is not None:
                return f"{self.path}:{line}"
        return self.path


def dotted(path: tuple[Any, ...]) -> str:
    """A key path as the user wrote it: images[0].include[1].python."""
    out = ""
    for part in path:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            out += ("." if out else "") + (text if "." not in text else f'"{text}"')
    return out or "(top)"
