"""Hostile matrix files: every class refused with one escaped `file:line` line per problem, never a traceback,
quickly and in bounded memory."""

from __future__ import annotations

import os
import re
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from builder.errors import MatrixError
from builder.matrix import expand, load_matrix
from builder.matrix.load import MAX_BYTES, MAX_DEPTH

from .conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]
BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def refused(path: Path) -> list[str]:
    """The problems load+expand report for `path`; each must be one clean line that names the file."""
    with pytest.raises(MatrixError) as info:
        expand(load_matrix(path))
    lines = info.value.lines()
    assert lines
    for line in lines:
        assert not BAD_CHARS.search(line), line
        assert len(line) < 600, line
        assert line.startswith(f"{path}:"), line
        assert "<unicode string>" not in line and "Traceback" not in line
    return lines


def small(old: str, new: str) -> str:
    assert old in SMALL, old
    return SMALL.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    """The 1-based line where `needle` starts in `text`."""
    return text[:text.index(needle)].count("\n") + 1


def write(tmp_path: Path, data: str | bytes, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# Times are CPU seconds of this process, so a loaded machine does not fail them.

# --- reading the file -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    (SMALL.replace("example/ml", "ex\xe4mple/ml").encode("latin-1"), ":2: not UTF-8 text (byte 0xe4 at offset 24)"),
    (SMALL.encode("utf-16"), ":1: not UTF-8 text (byte 0xff at offset 0)"),
    (SMALL.encode("utf-16-be"), ":1: character U+0000 is not allowed in YAML"),
    (bytes(range(256)) * 4, "not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n" + os.urandom(64), "not UTF-8 text"),
    (SMALL.encode() + b"\xc3", "not UTF-8 text"),
])
def test_non_utf8_files(tmp_path, data, expected):
    lines = refused(write(tmp_path, data))
    assert any(expected in line for line in lines), lines


def test_utf8_bom_is_fine(tmp_path):
    assert expand(load_matrix(write(tmp_path, "\ufeff" + SMALL)))[0]


def test_dev_zero_is_refused_at_once(tmp_path):
    start = time.process_time()
    with pytest.raises(MatrixError) as info:
        load_matrix("/dev/zero")
    assert info.value.lines() == ["/dev/zero: is a device, not a regular file: give the path of a matrix YAML file"]
    assert time.process_time() - start < 0.5


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "m.yaml"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def load() -> None:
        try:
            load_matrix(fifo)
        except MatrixError as exc:
            outcome.append(exc.lines())

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # it waits for a writer: give it one so the test ends, then fail
        with open(fifo, "w") as writer:
            writer.write("schema: 1\n")
        thread.join()
        pytest.fail("load_matrix blocked on a FIFO")
    assert outcome == [[f"{fifo}: is a FIFO, not a regular file: give the path of a matrix YAML file"]]


@pytest.mark.parametrize("name", ["dir", "", "nul\0byte", "x" * 300, "missing/m.yaml"])
def test_paths_that_are_no_file(tmp_path, name):
    if name == "dir":
        (tmp_path / name).mkdir()
    path = tmp_path / name if name else ""
    with pytest.raises(MatrixError) as info:
        load_matrix(path)
    (line,) = info.value.lines()
    assert "cannot read the matrix" in line or "not a regular file" in line
    assert not BAD_CHARS.search(line)


def test_size_cap(tmp_path):
    path = write(tmp_path, SMALL + "#" * MAX_BYTES)
    assert refused(path) == [f"{path}: larger than 1024 KiB, the most a matrix file may be"]


# --- the YAML's shape: depth, aliases, tags, merge keys, NUL ------------------------------------------------

def laughs(levels: int = 9, width: int = 10) -> str:
    out = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        out.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return SMALL + "\n".join(out) + "\n"


@pytest.mark.parametrize("text", [
    laughs(), laughs(12, 10), laughs(30, 2), SMALL + "loop: &a [*a]\n", SMALL + "loop: &a {x: *a, y: *a}\n",
    SMALL + "a: &a [" + ", ".join(["x"] * 400) + "]\nb: [" + ", ".join(["*a"] * 900) + "]\n",
])
def test_alias_bombs_are_refused_fast_in_bounded_memory(tmp_path, text):
    assert len(text) - len(SMALL) < 5000
    path = write(tmp_path, text)
    start = time.process_time()
    lines = refused(path)
    elapsed = time.process_time() - start
    assert elapsed < 0.5, elapsed
    tracemalloc.start()
    refused(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 << 20, peak
    assert any("alias" in line or "nested too deep" in line for line in lines), lines


@pytest.mark.parametrize("text", [
    SMALL + "deep: " + "[" * 5000 + "]" * 5000 + "\n",
    SMALL + "deep: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    SMALL + "deep:\n" + "".join("  " * i + f"k{i}:\n" for i in range(200)),
    SMALL + "deep:\n" + "".join("  " * i + "-\n" for i in range(300)) + "  " * 300 + "x\n",
])
def test_nesting_is_limited(tmp_path, text):
    lines = refused(write(tmp_path, text))
    assert any(f"nested deeper than {MAX_DEPTH} levels" in line for line in lines), lines


def test_the_default_matrix_takes_no_time():
    start = time.process_time()
    load_matrix(ROOT / "matrix.yaml")
    assert time.process_time() - start < 1


@pytest.mark.parametrize(("text", "line", "expected"), [
    (small("  debian11:\n    image: debian:bullseye-slim\n",
           "  debian11:\n    <<: {image: 'debian:bullseye-slim'}\n"), 11, "YAML merge keys (<<) are not supported"),
    (small("image: debian:bookworm-slim", "image: !custom debian:bookworm-slim"), 7, "YAML tag !custom is not allowed"),
    (small("image: debian:bookworm-slim", "image: !!binary aGVsbG8="), 7, "YAML tag tag:yaml.org,2002:binary is not"),
    (small("image: debian:bookworm-slim", "image: !!python/object:os.system x"), 7, "is not allowed"),
    (small("    python: [\"3.9\", \"3.11\", \"3.12\"]", "    python: !!set {a, b}"), 52, "is not allowed here"),
    (small("    python: [\"3.9\", \"3.11\", \"3.12\"]", "    python: !!omap [a: 1]"), 52, "is not allowed here"),
    (small("repository: example/ml", "repository: example/ml\0"), 2, "character U+0000 is not allowed in YAML"),
    (small("repository: example/ml", "repository: exa\x07mple"), 2, "character U+0007 is not allowed in YAML"),
    (small('python: "3.11"', "python: 2001-13-45"), 8, "'2001-13-45' is not a quoted MAJOR.MINOR"),
    (small("repository: example/ml", "repository: " + "9" * 5000), 2, "cannot read '99999"),
    (small("repository: example/ml", "repository: 0b" + "1" * 5000), 2, "must be a string"),
    (small("schema: 1", "schema: 1\n---\nschema: 1"), 2, "YAML syntax error"),
    (small("bases:\n", "? [a, b]\n: 1\nbases:\n"), 5, "a key must be a plain value, not '[a, b]'"),
])
def test_yaml_features_get_file_line(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    lines = refused(path)
    assert any(x.startswith(f"{path}:{line}: ") and expected in x for x in lines), lines


# --- values ------------------------------------------------------------------------------------------------

ARABIC_311 = "\u0663.\u0661\u0661"
FULLWIDTH_241 = "\uff12.\uff14.\uff11"


@pytest.mark.parametrize(("old", "new"), [
    ('python: "3.11"\n    bootstrap', f'python: "{ARABIC_311}"\n    bootstrap'),
    ('"2.4.1":\n        python', f'"{FULLWIDTH_241}":\n        python'),
    ('python: ["3.9", "3.10", "3.11"]', f'python: ["3.9", "3.10", "{ARABIC_311}"]'),
    ('"12.5":\n    cudnn', '"1\uff12.5":\n    cudnn'),
    ('floor: "525"}\n    image: {tag: "12.1.1"', 'floor: "\u0665\u0662\u0665"}\n    image: {tag: "12.1.1"'),
    ('ga: "530.30.02"', 'ga: "' + "5" * 5000 + '"'),
    ('floor: "525"}\n    image: {tag: "12.1.1"', 'floor: "' + "1" * 5000 + '"}\n    image: {tag: "12.1.1"'),
    ('ga: "530.30.02"', 'ga: "530.\U0001d7d830.02"'),
    ('tag: "12.1.1"', 'tag: "12.1.\u0967"'),
    ('{cudnn: "9.3.0.75"}', '{cudnn: "9.3.0.75", pins: ["nvidia-cudnn-cu12==9.\u0663.0"]}'),
    ('companions: {torchvision: "0.19.1"}', 'companions: {torchvision: "0.\u0661\u0669.1"}'),
    ('version: ["2.4.1"]', f'version: ["{FULLWIDTH_241}"]'),
    ('"2.4.1":\n        python', '"' + "2" * 40 + '":\n        python'),
    ('cudnn: "8.9"\n    driver: {ga: "530.30.02"', 'cudnn: "8.\u0669"\n    driver: {ga: "530.30.02"'),
    ('os: [ubuntu22.04]}\n  "12.5"', 'os: [ubuntu\u0662\u0662.04]}\n  "12.5"'),
])
def test_versions_are_ascii_digits_of_bounded_length(tmp_path, old, new):
    text = small(old, new)
    line = line_of(text, new)
    path = write(tmp_path, text)
    lines = refused(path)
    assert any(x.startswith(f"{path}:{line}: ") and "is not" in x for x in lines), lines


@pytest.mark.parametrize("value", ["true", "1.0", '"1"', "1.5", "null", "[1]", "2", "{a: 1}", "-1"])
def test_schema_must_be_the_integer_1(tmp_path, value):
    path = write(tmp_path, small("schema: 1", f"schema: {value}"))
    lines = refused(path)
    assert any(x.startswith(f"{path}:1: schema: ") for x in lines), lines


@pytest.mark.parametrize(("repository", "expected"), [
    ("a" * 300, "too long for an image repository"),
    ("a" * 250, "too long for an image repository"),  # fits alone, not with /tensorflow
    ("/".join(["ab"] * 90), "too long"),
    ("registry.example.com:5000/" + "x" * 240, "too long"),
])
def test_repository_names_fit_docker_limits_before_anything_is_written(tmp_path, repository, expected):
    path = write(tmp_path, small("repository: example/ml", f"repository: {repository}"))
    lines = refused(path)
    assert any(x.startswith(f"{path}:2: repository: ") and expected in x for x in lines), lines


def test_long_base_names_make_tags_too_long(tmp_path):
    long = "b" * 63
    text = small("  debian12:\n", f"  {long}:\n").replace("bases: [debian12]", f"bases: [{long}]")
    text = text.replace("bases: [debian11, debian12, cuda-devel]", f"bases: [debian11, {long}, cuda-devel]")
    text = text.replace('"2.4.1":\n', '"222222222.444444444.111111111.999999999":\n').replace('["2.4.1"]', '["222222222.444444444.111111111.999999999"]')
    path = write(tmp_path, text)
    lines = refused(path)
    assert any("is too long" in x and "characters; at most 128" in x for x in lines), lines


def test_base_image_references_are_checked(tmp_path):
    path = write(tmp_path, small("image: debian:bookworm-slim", "image: " + "d" * 300 + ":bookworm"))
    lines = refused(path)
    assert any(x.startswith(f"{path}:7: bases.debian12.image: ") and "too long" in x for x in lines), lines


# --- groups: empty excludes, excludes that remove everything, repeats, combination bombs -------------------

@pytest.mark.parametrize(("text", "line", "expected"), [
    (small('      python: ["3.9", "3.11", "3.12"]\n', '      python: ["3.9", "3.11", "3.12"]\n    exclude: [{}]\n'),
     53, "images[0].exclude[0]: an empty exclude matches every combination"),
    (small('      python: ["3.9", "3.11", "3.12"]\n', '      python: ["3.9", "3.11", "3.12"]\n    exclude: [{}]\n'),
     53, "images[0].exclude: removes every one of the"),
    (small('      flavor: [devel]\n', '      flavor: [devel]\n    exclude: [{flavor: devel}]\n'),
     59, "images[1].exclude: removes every one of the 4 combinations"),
    (SMALL + '  - framework: tensorflow\n    bases: [debian12]\n    include:\n'
     '      - {version: "2.18.0", cuda: "12.5", python: "3.11"}\n', 63, "images[3]: the same group as images[2]"),
    (small('      - {version: "2.18.0", cuda: "12.5", python: "3.11"}\n',
           '      - {version: "2.18.0", cuda: "12.5", python: "3.11"}\n'
           '      - {python: "3.11", cuda: "12.5", version: "2.18.0"}\n'),
     63, "images[2].include[1]: the same combination as include[0]"),
])
def test_groups_that_ask_for_nothing_or_repeat_are_named(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    lines = refused(path)
    assert any(x.startswith(f"{path}:{line}: ") and expected in x for x in lines), lines


def test_combination_bomb_is_refused_before_expanding(tmp_path):
    pythons = ", ".join(f'"3.{i}"' for i in range(300))
    cudas = "".join(f'  "12.{i}": &c{i}\n    cudnn: "9.3"\n    driver: {{ga: "555.42.02", floor: "525"}}\n'
                    f'    image: {{tag: "12.{i}.1", cudnn: cudnn, os: [ubuntu22.04]}}\n' for i in range(10, 110))
    text = small("frameworks:\n", cudas + "frameworks:\n")
    lines_ = ", ".join(f'"12.{i}"' for i in range(10, 110))
    text += f"  - framework: torch\n    bases: [debian12]\n    axes:\n      python: [{pythons}]\n" \
            f"      cuda: [{lines_}]\n      flavor: [runtime, devel]\n"
    path = write(tmp_path, text)
    start = time.process_time()
    lines = refused(path)
    assert time.process_time() - start < 3
    assert any("the matrix asks for more than 20000 combinations" in x for x in lines), lines


# --- error lines -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ['"a\\nb"', '"\\e[2J\\e[H"', '"x\\u2028y"', '"\\r"', '"' + "k" * 500 + '"', '"\\0"'])
def test_keys_are_escaped_like_values(tmp_path, key):
    path = write(tmp_path, small("  debian11:\n", f"  {key}:\n"))
    refused(path)


@pytest.mark.parametrize(("written", "shown"), [
    ("true", "bases.true"), ("1", "bases.1"), ("null", "bases.null"), ("~", "bases.~"), ("0x1F", "bases.0x1F"),
    ("12.50", 'bases."12.50"'), ("1.0e+3", 'bases."1.0e+3"'), ("-7", "bases.-7"), ("false", "bases.false"),
])
def test_non_string_keys_are_shown_as_written(tmp_path, written, shown):
    path = write(tmp_path, small("  debian11:\n", f"  {written}:\n"))
    lines = refused(path)
    assert any(f": {shown}" in x for x in lines), lines


@pytest.mark.parametrize("value", ["x" * 5000, "\\e[31m" * 300, "a\\nb" * 400, "\\u2028" * 100])
def test_long_values_are_cut(tmp_path, value):
    path = write(tmp_path, small("image: debian:bookworm-slim", f'image: "{value}"'))
    lines = refused(path)
    assert any(x.startswith(f"{path}:7: ") and "characters)" in x for x in lines), lines


def test_notes_are_one_printable_line(tmp_path):
    path = write(tmp_path, small('"12.5": {cudnn: "9.3.0.75"}', '"12.5": {cudnn: "9.3.0.75", note: "a\\e[2Jb"}'))
    lines = refused(path)
    assert any("is not one line of printable text" in x for x in lines), lines


def test_default_matrix_is_within_every_limit():
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"))
    assert cells
