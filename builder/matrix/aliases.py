"""Aliases: tags that move to the newest cell of a kind (e.g. the newest torch per CUDA line).

Declared in `matrix.yaml` under `aliases:`; checked when the matrix loads (a bad one is a `file:line`
error before anything runs) and assigned to cells by `push`. Tag rules live in builder.tags.
"""

from __future__ import annotations

from packaging.version import Version

from builder import tags
from builder.matrix.model import Cell, Matrix


def fields(cell: Cell) -> dict[str, str]:
    """The values an alias template may use, for one cell."""
    return {"cuda": cell.cuda or "cpu", "cudnn": ".".join((cell.cudnn or "none").split(".")[:2]),
            "python": cell.python, "flavor": cell.flavor, "base": cell.base.name, "version": cell.version,
            "minor": ".".join(cell.version.split(".")[:2])}


def _assign(matrix: Matrix, cells: list[Cell]) -> tuple[dict[str, list[str]], list[str]]:
    """(cell tag -> aliases, problems as `file:line: aliases.N.tag: message`)."""
    out: dict[str, list[str]] = {}
    problems: list[str] = []
    owners: dict[str, str] = {c.tag: c.tag for c in cells}  # full reference -> the cell that has it
    for i, alias in enumerate(getattr(matrix.spec, "aliases", None) or []):
        where = f"{matrix.path}:{matrix.lines.get(('aliases', i, 'tag'), matrix.lines.get(('aliases', i), 1))}: " \
                f"aliases.{i}.tag"
        problem = tags.alias_problem(alias.tag)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        groups: dict[str, list[Cell]] = {}
        for cell in cells:
            if cell.framework != alias.framework:
                continue
            wanted = alias.where.model_dump(exclude_none=True)
            if any(fields(cell).get(k) != v for k, v in wanted.items()):
                continue
            groups.setdefault(tags.alias_tag(alias.tag, fields(cell)), []).append(cell)
        if not groups:
            problems.append(f"{where}: {alias.tag!r} matches no cell of {alias.framework}")
            continue
        for name, members in sorted(groups.items()):
            newest = max(Version(c.version) for c in members)
            top = [c for c in members if Version(c.version) == newest]
            if len(top) > 1:
                problems.append(f"{where}: {name!r} would name {len(top)} cells of {alias.framework} {newest} "
                                f"({', '.join(c.tag.rsplit(':', 1)[1] for c in top[:3])}): add a placeholder such "
                                "as {python} or narrow it with `where:`")
                continue
            cell = top[0]
            ref = f"{cell.tag.rsplit(':', 1)[0]}:{name}"
            if ref in owners and owners[ref] != cell.tag:
                problems.append(f"{where}: {name!r} is already the tag of {owners[ref]}")
                continue
            owners[ref] = cell.tag
            out.setdefault(cell.tag, []).append(name)
    return out, problems


def check_aliases(matrix: Matrix, cells: list[Cell]) -> list[str]:
    """Every problem with the matrix's aliases (and its `registry:`), as `file:line: path: message`."""
    problems = []
    registry = getattr(matrix.spec, "registry", None)
    if registry:
        problem = tags.registry_problem(registry)
        if problem:
            problems.append(f"{matrix.path}:{matrix.lines.get(('registry',), 1)}: registry: {problem}")
    return problems + _assign(matrix, cells)[1]


def assign(matrix: Matrix, cells: list[Cell]) -> dict[str, tuple[str, ...]]:
    """Cell tag -> its alias tags, for the whole matrix's cells (newest is judged over all of them)."""
    return {tag: tuple(names) for tag, names in _assign(matrix, cells)[0].items()}
