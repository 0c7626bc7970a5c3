"""Read `matrix.yaml` with the line of every key, and report every problem at once as `file:line: path: msg`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from builder.errors import MatrixError
from builder.matrix import schema
from builder.matrix.model import Matrix, dotted, printable
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
    schema.NOTE: "one line of printable text",
    schema.SHA256: "a sha256: 64 lower-case hex digits",
    schema.MODEL_URL: "an http(s) model URL ending in its file name, without query or user",
}

# Limits on what a matrix file may cost to read. The default matrix is about 10 KB, 800 nodes and 8 levels
# deep: these leave room for a hundred times that, and stop a hostile file (a FIFO, /dev/zero, a
# "billion laughs" of nested aliases) in well under a second and a few MB of memory.
MAX_BYTES = 1 << 20  # 1 MiB read, at most
MAX_DEPTH = 32  # levels of nested mappings and lists
MAX_NODES = 20_000  # values after alias expansion: an alias counts as many nodes as it stands for
MAX_ALIASES = 1_000  # alias uses (*name) in the file
Lines = dict[tuple[Any, ...], int]
Raw = dict[tuple[Any, ...], str]

_TAG = "tag:yaml.org,2002:"
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
# The scalar kinds a matrix may hold, and how to read each; a timestamp-looking value stays text.
_SCALARS: dict[str, Callable[[yaml.ScalarNode], Any]] = {
    _TAG + "str": lambda node: node.value,
    _TAG + "timestamp": lambda node: node.value,
    _TAG + "int": _CONSTRUCTOR.construct_yaml_int,
    _TAG + "float": _CONSTRUCTOR.construct_yaml_float,
    _TAG + "bool": _CONSTRUCTOR.construct_yaml_bool,
    _TAG + "null": _CONSTRUCTOR.construct_yaml_null,
}


class _TooMuch(Exception):
    """A limit on the file's shape was passed: where, and which."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(message)


class _Loader(yaml.SafeLoader):
    """The safe loader, composing only: it counts alias uses and nesting depth as it goes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark else 1
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _TooMuch(line, f"more than {MAX_ALIASES} YAML aliases (*name)")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooMuch(line, f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


@dataclass
class _Walk:
    """What turning the node tree into plain data records: lines, written text, problems, and a budget."""

    file: str
    lines: Lines = field(default_factory=dict)
    raw: Raw = field(default_factory=dict)
    written: dict[tuple[Any, ...], str] = field(default_factory=dict)  # non-string keys, as written
    keys: dict[tuple[Any, ...], list[tuple[Any, str]]] = field(default_factory=dict)  # non-string keys by mapping
    problems: list[str] = field(default_factory=list)
    nodes: int = 0

    def problem(self, node: yaml.Node, path: tuple[Any, ...], message: str) -> None:
        self.problems.append(f"{self.file}:{node.start_mark.line + 1}: {dotted(path, self.written)}: {message}")

    def walk(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        """Turn a composed YAML node into plain data, recording lines, raw scalar text and duplicate keys."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooMuch(node.start_mark.line + 1, f"more than {MAX_NODES} values once YAML aliases are "
                           "expanded (an alias bomb?)")
        if len(path) > MAX_DEPTH:  # a recursive alias (&a [*a]) would otherwise never end
            raise _TooMuch(node.start_mark.line + 1, f"{dotted(path[:3])}: nested too deep (a recursive YAML alias?)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                self.problem(node, path, f"YAML tag {printable(node.tag)} is not allowed here; write a plain mapping")
                return None
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                self.problem(node, path, f"YAML tag {printable(node.tag)} is not allowed here; write a plain list")
                return None
            return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        self.raw[path] = node.value
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: tuple[Any, ...]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            self.nodes += 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, f"a key must be a plain value, not {self._as_written(key_node)}")
                continue
            if key_node.tag == _TAG + "merge":
                self.problem(key_node, path, "YAML merge keys (<<) are not supported: write the keys out")
                continue
            key = self._scalar(key_node, path)
            # pydantic names mapping keys by their string form (ints stay ints), so paths use it too
            kpath = (*path, key if isinstance(key, str) else str(key))
            if not isinstance(key, str):
                self.written[kpath] = key_node.value
                self.keys.setdefault(path, []).append((key, kpath[-1]))
            if key in out or (kpath in self.lines and not isinstance(key, str)):
                first = self.lines.get(kpath)
                self.problem(key_node, kpath, f"duplicate key (first defined at line {first})")
                continue
            self.lines[kpath] = key_node.start_mark.line + 1
            self.lines[(*kpath, "[key]")] = key_node.start_mark.line + 1
            self.raw[(*kpath, "[key]")] = key_node.value
            out[key] = self.walk(value_node, kpath)
        return out

    def _scalar(self, node: yaml.ScalarNode, path: tuple[Any, ...]) -> Any:
        read = _SCALARS.get(node.tag)
        if read is None:
            self.problem(node, path, f"YAML tag {printable(node.tag)} is not allowed (only plain text, numbers, "
                         "true/false, lists and mappings)")
            return node.value
        try:
            return read(node)
        except (ValueError, OverflowError, yaml.YAMLError):
            kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
                node.tag.removeprefix(_TAG), "a value")
            self.problem(node, path, f"cannot read {shown(node.value)} as {kind}; quote it if it is text")
            return node.value

    def _as_written(self, node: yaml.Node) -> str:
        text = node.start_mark.buffer[node.start_mark.index:node.end_mark.index] if node.start_mark.buffer else ""
        return shown(text or node.tag)


def _expanded_size(node: yaml.Node, memo: dict[int, int], depth: int = 0) -> int:
    """How many nodes `node` stands for once its aliases are expanded, in time linear in the file: an alias is
    the same node object, counted once and remembered. A cycle (&a [*a]) is nesting without end."""
    known = memo.get(id(node))
    if known is not None:
        return known
    if depth > MAX_DEPTH:
        raise _TooMuch(node.start_mark.line + 1, "nested too deep (a recursive YAML alias?)")
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, memo, depth + 1) for item in node.value)
    memo[id(node)] = size
    return size


def _check_size(node: yaml.Node) -> None:
    """Refuse an alias bomb before expanding it, at the line of the first top-level key that passes the limit."""
    memo: dict[int, int] = {}
    if _expanded_size(node, memo) <= MAX_NODES:
        return
    total, line = 1, 1
    for key, value in node.value if isinstance(node, yaml.MappingNode) else []:
        total += memo[id(key)] + memo[id(value)]
        line = key.start_mark.line + 1
        if total > MAX_NODES:
            break
    raise _TooMuch(line, f"more than {MAX_NODES} values once YAML aliases are expanded (an alias bomb?)")


def shown(value: Any) -> str:
    """A value for an error line: quoted, escaped and cut short."""
    if isinstance(value, str):
        return printable(repr(value) if len(value) <= 60 else repr(value[:60]) + f"...({len(value)} characters)",
                         None)
    return printable(repr(value), 80)


def _message(err: dict[str, Any], raw_text: str | None) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "string_type" and isinstance(value, (float, int)) and not isinstance(value, bool):
        text = printable(raw_text if raw_text is not None else str(value), 40)
        if isinstance(value, float) and text != repr(value):
            number = printable(repr(value), 40)
            return f'YAML reads the unquoted {text} as the number {number}; write it quoted: "{text}"'
        return f'must be a string: write it quoted: "{text}"'
    if kind == "string_type" and raw_text is not None and not isinstance(value, (dict, list)):
        return f"must be a string, not {printable(raw_text, 40)}: write it quoted if it is one"
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern", "")
        return f"{shown(value)} is not {PATTERN_NAMES.get(pattern, 'of the allowed form')}"
    if kind == "extra_forbidden":
        return "unknown key (check its spelling against the README's matrix format)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    return printable(msg.removeprefix("Value error, "), 200)


def _read(path: str | Path, file: str) -> str:
    """The file's text: a regular file, at most MAX_BYTES, UTF-8 (a BOM is allowed)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise MatrixError([f"{file}: cannot read the matrix: {exc.strerror}"]) from None
    except ValueError as exc:  # a NUL in the path
        raise MatrixError([f"{file}: cannot read the matrix: {printable(str(exc))}"]) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or special file")
            raise MatrixError([f"{file}: is {kind}, not a regular file: give the path of a matrix YAML file"])
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, min(1 << 16, MAX_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise MatrixError([f"{file}: cannot read the matrix: {exc.strerror}"]) from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise MatrixError([f"{file}: larger than {MAX_BYTES // 1024} KiB, the most a matrix file may be"])
    data = b"".join(chunks)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise MatrixError([f"{file}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                           "save the matrix as UTF-8"]) from None


def _compose(text: str, file: str) -> yaml.Node | None:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks every character here
        return loader.get_single_node()
    except _TooMuch as exc:
        raise MatrixError([f"{file}:{exc.line}: {exc.message}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else printable(repr(exc.character))
        raise MatrixError([f"{file}:{line}: character {char} is not allowed in YAML (NUL and control characters "
                           "are refused)"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise MatrixError([f"{file}:{line}: YAML syntax error: {printable(str(exc.problem or exc.context), 200)}"]) \
            from None
    except yaml.YAMLError as exc:
        raise MatrixError([f"{file}:1: YAML error: {printable(type(exc).__name__)}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_matrix(path: str | Path) -> Matrix:
    """Load and validate a matrix file. Raises MatrixError listing every problem, one per line."""
    file = printable(str(path), None)
    text = _read(path, file)
    node = _compose(text, file)
    if node is None:
        raise MatrixError([f"{file}:1: the matrix is empty"])
    walk = _Walk(file=file)
    try:
        _check_size(node)
        data = walk.walk(node, ())
    except _TooMuch as exc:
        raise MatrixError([f"{file}:{exc.line}: {exc.message}"]) from None
    lines = walk.lines
    if not isinstance(data, dict):
        raise MatrixError([f"{file}:1: the matrix must be a mapping of sections (schema, bases, ...)"])
    problems = walk.problems
    spec = None
    try:
        spec = schema.MatrixFile.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _located(tuple(err["loc"]), lines, walk.keys)
            line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), 1)
            problems.append(f"{file}:{line}: {dotted(loc, walk.written)}: {_message(dict(err), walk.raw.get(loc))}")
    order = _line_order(file)
    if problems or spec is None:
        raise MatrixError(sorted(set(problems), key=order))
    matrix = Matrix(path=file, spec=spec, lines=lines)
    problems = check_references(matrix)
    if not problems and (spec.aliases or spec.registry):
        # Aliases choose among the expanded cells, so they are checked once the rest is known to be sound.
        from builder.matrix.aliases import check_aliases
        from builder.matrix.expand import expand

        problems = check_aliases(matrix, expand(matrix)[0])
    if problems:
        raise MatrixError(sorted(set(problems), key=order))
    return matrix


def _located(loc: tuple[Any, ...], lines: Lines, keys: dict[tuple[Any, ...], list[tuple[Any, str]]]) -> tuple[Any, ...]:
    """pydantic's error location with its non-string mapping keys named as the walk recorded them: pydantic
    gives `true` as 1 and `3` as 3, the walk records "True" and "3"."""
    out: tuple[Any, ...] = ()
    for part in loc:
        if isinstance(part, int) and (*out, part) not in lines:
            part = next((name for key, name in keys.get(out, []) if key == part and key is not None), part)
        out = (*out, part)
    return out


def _line_order(file: str) -> Callable[[str], tuple[int, str]]:
    def order(problem: str) -> tuple[int, str]:
        line = problem[len(file) + 1:].split(":", 1)[0]
        return (int(line) if line.isdigit() else 0, problem)

    return order
