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
class Model:
    """A pretrained model a cell bakes in (schema.ModelSpec): its canonical `url` is the hub's cache key."""

    name: str
    hub: str  # torch or tfhub
    url: str
    sha256: str
    input: tuple[int, ...]
    arch: str | None = None  # torch: the torchvision architecture the weights fit


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
    index: str | None  # primary package index URL; None means the configured default (PyPI). Never claimed.
    requirements: tuple[str, ...]
    driver_ga: str | None
    driver_floor: str | None
    unverified: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    index_name: str | None = None  # the matrix's name for `index` (e.g. pytorch-cu118); None: the default
    toolchain: tuple[str, ...] = ()  # a devel cell's CUDA compiler from wheels (cuda-toolkit extras); () for none
    models: tuple[Model, ...] = ()  # pretrained models baked in, each a layer of its own (builder.models)
    installer: str | None = None  # the installer pin (uv==X; direct builds); None: pip. Not a claim.

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
        """What the cell claims, as recorded in cell.json and checked inside the image.

        cell.json is copied into the image, so no URL is claimed: an index or mirror URL may carry a token in
        its path. The index is named as the matrix names it, the base's bootstrap by its suite only.
        """
        data = asdict(self)
        data["tag"] = self.tag
        data["index"] = data.pop("index_name") or "default"
        if not self.models:  # a cell without models claims exactly what it claimed before models existed
            del data["models"]
        del data["installer"]  # how the image was made, not what it holds: its pin is in the context
        if data["base"]["bootstrap"]:
            data["base"]["bootstrap"] = {"suite": self.base.bootstrap.suite if self.base.bootstrap else None}
        return data


Wanted = str | tuple[str, ...] | None


def _wanted(value: str, wanted: Wanted) -> bool:
    if wanted is None:
        return True
    return value == wanted if isinstance(wanted, str) else value in wanted


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The selectors every command takes. Every selector given must match; the values given for one
    selector (a tuple: `--python 3.10 --python 3.11`) are OR'ed, like the globs in `only`.

    `framework` values are names or NAME==VERSION; `framework_version`, when given, applies to all of them.
    """

    cuda: Wanted = None
    python: Wanted = None
    framework: Wanted = None
    framework_version: str | None = None
    flavor: Wanted = None
    only: tuple[str, ...] = ()

    def matches(self, cell: Cell) -> bool:
        return self.matches_fields(framework=cell.framework, version=cell.version, cuda=cell.cuda or "cpu",
                                   python=cell.python, flavor=cell.flavor, tag=cell.tag)

    def frameworks(self) -> tuple[tuple[str, str | None], ...]:
        """The framework selectors as (name, version or None)."""
        specs = (self.framework,) if isinstance(self.framework, str) else self.framework or ()
        out = []
        for spec in specs:
            name, _, version = spec.partition("==")
            out.append((name, version or None))
        return tuple(out)

    def matches_fields(
        self, *, framework: str, version: str, cuda: str, python: str, flavor: str, tag: str | None,
        tags: tuple[str, ...] = (),
    ) -> bool:
        """Match by fields. A combination that never became a cell has no tag: `only` matches the tags it
        would have had (`tags`), and lets it pass when none are known."""
        candidates = (tag,) if tag is not None else tags
        fws = self.frameworks()
        checks = [
            _wanted(cuda, self.cuda),
            _wanted(python, self.python),
            not fws or any(framework == n and (v is None or version == v) for n, v in fws),
            self.framework_version is None or version == self.framework_version,
            _wanted(flavor, self.flavor),
            not self.only or not candidates
            or any(fnmatch.fnmatchcase(t, g) for t in candidates for g in self.only),
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


def printable(text: str, limit: int | None = 80) -> str:
    """`text` safe for one line of a terminal: control, escape and line-breaking characters are written
    as escapes (\\n, \\x1b, \\u2028), and text longer than `limit` is cut, saying how long it was."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if limit is not None and len(out) > limit:
        return f"{out[:limit]}...({len(text)} characters)"
    return out


def dotted(path: tuple[Any, ...], written: dict[tuple[Any, ...], str] | None = None) -> str:
    """A key path as the user wrote it: images[0].include[1].python.

    `written` maps a key's path to its text as written in the file, for keys that are not strings
    (`true`, `12.50`); every key is escaped and cut short, like a value.
    """
    out = ""
    for i, part in enumerate(path):
        if part == "[key]":
            continue
        as_written = written.get(tuple(path[: i + 1])) if written else None
        if isinstance(part, int) and as_written is None:
            out += f"[{part}]"
        else:
            text = printable(as_written if as_written is not None else str(part), 60)
            out += ("." if out else "") + (text if "." not in text else f'"{text}"')
    return out or "(top)"
