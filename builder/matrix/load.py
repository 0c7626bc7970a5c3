"""Read `matrix.yaml` with the line of every key, and report every problem at once as `file:line: path: msg`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from builder.errors import MatrixError
from builder.matrix import schema
from builder.matrix.model import Matrix, dotted
from builder.matrix.rules import check_references

PATTERN_NAMES = {
    schema.MAJOR_MINOR: 'a quoted MAJOR.MINOR version such as "3.11"',
    schema.VERSION: 'a quoted version such as "2.4.1"',
    schema.NAME: "a lower-case name (letters, digits, '.', '_', '-')",
    schema.IMAGE_REF: "an image reference such as debian:bookworm-slim",
    schema.REPOSITORY: "an image repository such as registry.example.com/ml",
    schema.URL: "an http(s) URL without spaces, quotes or query",
    schema.SUITE: "a Debian/Ubuntu suite name such as bookworm",
    schema.OS_TAG: "an OS tag such as ubuntu22.04",
    schema.CUDNN_TOKEN: "an nvidia/cuda cuDNN tag piece: cudnn, cudnn8, cudnn9 or empty",
    schema.CUDA_LINE: 'a CUDA line such as "12.1", or cpu',
    schema.REQUIREMENT: "an exact pin such as nvidia-cudnn-cu12==9.3.0.75",
    r"^[^\n\r]*$": "one line of text",
}

MAX_DEPTH = 32
Lines = dict[tuple[Any, ...], int]
Raw = dict[tuple[Any, ...], str]


def _walk(
    node: yaml.Node, path: tuple[Any, ...], lines: Lines, raw: Raw, problems: list[str], file: str
) -> Any:
    """Turn a composed YAML node into plain data, recording lines, raw scalar text and duplicate keys."""
    if len(path) > MAX_DEPTH:  # a recursive alias (&a [*a]) would otherwise never end
        raise MatrixError([f"{file}:{node.start_mark.line + 1}: {dotted(path[:3])}: nested too deep "
                           "(a recursive YAML alias?)"])
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            # pydantic names mapping keys by their string form, so paths use it too
            kpath = (*path, key if isinstance(key, str) else str(key))
            if key in out:
                first = lines.get(kpath)
                problems.append(
                    f"{file}:{key_node.start_mark.line + 1}: {dotted(kpath)}: duplicate key "
                    f"(first defined at line {first})"
                )
                continue
            lines[kpath] = key_node.start_mark.line + 1
            lines[(*kpath, "[key]")] = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                raw[(*kpath, "[key]")] = key_node.value
            out[key] = _walk(value_node, kpath, lines, raw, problems, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*path, i), lines, raw, problems, file) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    raw[path] = node.value
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    return yaml.SafeLoader("").construct_scalar(node) if node.tag.endswith(":str") else _resolved(node)


def _resolved(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


def _message(err: dict[str, Any], raw_text: str | None) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "string_type" and isinstance(value, (float, int)) and not isinstance(value, bool):
        text = raw_text if raw_text is not None else str(value)
        if isinstance(value, float) and text != repr(value):
            return f'YAML reads the unquoted {text} as the number {value}; write it quoted: "{text}"'
        return f'must be a string: write it quoted: "{text}"'
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern", "")
        return f"{value!r} is not {PATTERN_NAMES.get(pattern, 'of the allowed form')}"
    if kind == "extra_forbidden":
        return "unknown key (check its spelling against the README's matrix format)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def load_matrix(path: str | Path) -> Matrix:
    """Load and validate a matrix file. Raises MatrixError listing every problem, one per line."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MatrixError([f"{file}: cannot read the matrix: {exc.strerror}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise MatrixError([f"{file}:{line}: YAML syntax error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise MatrixError([f"{file}: YAML error: {exc}"]) from None
    if node is None:
        raise MatrixError([f"{file}:1: the matrix is empty"])
    lines: Lines = {}
    raw: Raw = {}
    problems: list[str] = []
    try:
        data = _walk(node, (), lines, raw, problems, file)
    except yaml.YAMLError as exc:
        raise MatrixError([f"{file}: YAML error: {exc}"]) from None
    if not isinstance(data, dict):
        raise MatrixError([f"{file}:1: the matrix must be a mapping of sections (schema, bases, ...)"])
    spec = None
    try:
        spec = schema.MatrixFile.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), 1)
            problems.append(f"{file}:{line}: {dotted(loc)}: {_message(dict(err), raw.get(loc))}")
    if problems or spec is None:
        raise MatrixError(sorted(set(problems), key=_line_order))
    matrix = Matrix(path=file, spec=spec, lines=lines)
    problems = check_references(matrix)
    if problems:
        raise MatrixError(sorted(set(problems), key=_line_order))
    return matrix


def _line_order(problem: str) -> tuple[int, str]:
    parts = problem.split(":", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, problem)
