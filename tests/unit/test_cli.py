"""The command line, through main(argv): output formats, selectors, and one-line errors."""

from __future__ import annotations

import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from builder import render as render_module
from builder.cli import main, parser

ROOT = Path(__file__).resolve().parents[2]
MATRIX = str(ROOT / "matrix.yaml")


def test_matrix_json_lists_cells_with_claims(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 30
    row = next(r for r in rows if r["tag"] == "builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12")
    assert row["cuda"] == "12.1" and row["cudnn"] == "9.1.0.70" and row["python"] == "3.11"
    assert row["framework"] == "torch==2.4.1" and row["flavor"] == "runtime"
    assert any(r["framework"].startswith("tensorflow==") for r in rows)


def test_cuda_selector_keeps_only_that_cuda(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--cuda", "12.1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["cuda"] for r in rows} == {"12.1"}


def test_framework_version_selector(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "torch==2.4.1", "--python", "3.11", "--format",
                 "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["framework"] == "torch==2.4.1" and r["python"] == "3.11" for r in rows)


def test_github_format_is_a_strategy_matrix(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "tensorflow", "--format", "github"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"include"} and data["include"]
    assert set(data["include"][0]) == {"tag", "framework", "version", "cuda", "python", "flavor", "base"}


def test_table_and_explain(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "torch==2.1.2", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["TAG", "BASE", "PYTHON", "CUDA", "CUDNN", "FRAMEWORK", "FLAVOR"]
    assert "torch==2.1.2 cuda12.1 py3.12 runtime: torch 2.1.2 publishes no cp312 wheel" in out
    assert "[rule python-wheels; fact at" in out


def test_render_writes_contexts(tmp_path, capsys):
    assert main(["--matrix", MATRIX, "render", "--cuda", "12.1", "--python", "3.11", "--out", str(tmp_path)]) == 0
    dockerfiles = list(tmp_path.glob("*/Dockerfile"))
    assert dockerfiles and len(dockerfiles) == len(capsys.readouterr().out.splitlines())
    for path in dockerfiles:
        # the payload is not in the context (certify brings it), so a new check changes no image
        assert (path.parent / "cell.json").is_file() and not (path.parent / "smoke").exists()


def test_explicit_impossible_combination_is_one_line_error(tmp_path, capsys):
    text = (ROOT / "matrix.yaml").read_text() + (
        "  - framework: torch\n    bases: [debian13]\n    include:\n"
        '      - {version: "2.1.2", cuda: "12.1", python: "3.12"}\n'
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["--matrix", str(path), "matrix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = text.count("\n")
    fact = text.splitlines().index('      "2.1.2":') + 2  # its python: line, 1-based
    last = text.count("\n  - framework:") - 1  # the group appended above
    assert err == [f"{path}:{line}: images[{last}].include[0]: impossible combination torch==2.1.2 cuda12.1 py3.12 "
                   "runtime: torch 2.1.2 publishes no cp312 wheel (wheels exist for Python 3.8, 3.9, 3.10, 3.11) "
                   f"[rule python-wheels; fact at {path}:{fact}]"]


def test_unknown_framework_and_empty_selection_are_errors(capsys, tmp_path):
    out = str(tmp_path / "out")
    assert main(["--matrix", MATRIX, "render", "--framework", "jax", "--out", out]) == 2
    err = capsys.readouterr().err.strip()  # the names come from the matrix, not from the code
    assert "\n" not in err and "--framework jax matches no cell (the matrix has tensorflow" in err, err
    assert main(["--matrix", MATRIX, "render", "--python", "2.7", "--out", out]) == 2
    assert "no cell matches the selectors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_engine_unreachable_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert main(["--matrix", MATRIX, "build", "--only", "*torch:2.4.1-cpu-*"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no Docker engine answers at unix:///nonexistent/docker.sock")
    assert "DOCKER_HOST" in err[0]


@pytest.fixture
def no_engine(monkeypatch):
    """Any command that reached the engine would exit 3, not 2."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")


def usage_exit(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["build", "certify"])
@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "65", "\u0663", "999999999999", "", " 2", "0x2"])
def test_jobs_must_be_1_to_64_before_the_engine_is_contacted(no_engine, capsys, command, value):
    err = usage_exit(["--matrix", MATRIX, command, "--only", "*torch:2.4.1-cpu-*", "-j", value], capsys)
    assert "-j/--jobs" in err and "is not a number of jobs from 1 to 64" in err


@pytest.mark.parametrize("command", ["certify", "pull"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "-1", "0", "1e999", "x", "604801", "", "\u0663"])
def test_timeout_must_be_finite_and_positive(no_engine, capsys, value, command):
    err = usage_exit(["--matrix", MATRIX, command, "--only", "*torch:2.4.1-cpu-*", f"--timeout={value}"], capsys)
    assert "--timeout" in err and "is not a number of seconds" in err


@pytest.mark.parametrize("command", ["certify", "pull"])
@pytest.mark.parametrize("value", ["lots", "", "-1g", "1k", "5m", "8x", "1e9", "9999999999g", "8 g", "\uff18g"])
def test_memory_must_be_a_size(no_engine, capsys, value, command):
    err = usage_exit(["--matrix", MATRIX, command, "--only", "*torch:2.4.1-cpu-*", f"--memory={value}"], capsys)
    assert "--memory" in err and "is not a memory size" in err


@pytest.mark.parametrize(("flag", "value", "parsed"), [
    ("--timeout", "30", 30.0), ("--timeout", "0.5", 0.5), ("--memory", "512m", "512m"), ("--memory", "8G", "8g"),
    ("--memory", "1.5g", "1.5g"), ("--memory", "8gb", "8gb"), ("-j", "64", 64), ("-j", "1", 1),
])
def test_good_values_pass(flag, value, parsed):
    args = parser().parse_args(["certify", flag, value])
    assert getattr(args, {"--timeout": "timeout", "--memory": "memory", "-j": "jobs"}[flag]) == parsed


def test_repeated_selectors_are_ored(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--python", "3.10", "--python", "3.12", "--framework", "torch==2.4.1",
                 "--framework", "tensorflow==2.18.0", "--cuda", "12.1", "--cuda", "12.5", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["python"] for r in rows} == {"3.10", "3.12"}
    assert {r["framework"] for r in rows} == {"torch==2.4.1", "tensorflow==2.18.0"}
    assert {r["cuda"] for r in rows} == {"12.1", "12.5"}


@pytest.mark.parametrize(("selector", "hint"), [
    (["--python", "3.1"], "--python 3.1 matches no cell (did you mean 3.10?)"),
    (["--cuda", "12.7"], "--cuda 12.7 matches no cell (did you mean 12.6?)"),
    (["--framework", "torch==2.4.2"], "--framework torch==2.4.2 matches no cell (did you mean torch==2.4.1?)"),
    (["--only", "*torch:9.9*"], "--only *torch:9.9* matches no cell's tag"),
    (["--framework", "tensorflow", "--python", "3.13", "--cuda", "12.1"], "no cell has all of the selectors at once"),
])
@pytest.mark.parametrize("command", ["matrix", "render", "build", "certify", "clean"])
def test_a_selector_that_matches_nothing_says_so_with_a_hint_and_exit_2(no_engine, tmp_path, capsys, selector, hint,
                                                                        command):
    extra = ["--out", str(tmp_path / "out")] if command == "render" else []
    assert main(["--matrix", MATRIX, command, *selector, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no cell matches the selectors" in err[0] and hint in err[0], err
    assert not (tmp_path / "out").exists()


def test_explain_json_stays_json_and_honours_only(capsys):
    glob = "*tensorflow:2.16.1-*"
    assert main(["--matrix", MATRIX, "matrix", "--only", glob, "--explain", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"cells", "dropped"} and data["cells"] and data["dropped"]
    assert all(fnmatchcase(c["tag"], glob) for c in data["cells"])
    for d in data["dropped"]:
        assert d["framework"] == "tensorflow" and d["version"] == "2.16.1", d
        assert any(fnmatchcase(t, glob) for t in d["tags"]) and d["rule"] and d["fact_at"].startswith(MATRIX)


def test_explain_github_keeps_stdout_a_strategy_matrix(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--framework", "torch==2.1.2", "--explain", "--format", "github"]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) == {"include"}
    assert "Dropped combinations" in captured.err and "publishes no cp312 wheel" in captured.err


def test_explain_table_honours_only(capsys):
    assert main(["--matrix", MATRIX, "matrix", "--only", "*torch:2.1.2-*", "--explain"]) == 0
    out = capsys.readouterr().out
    dropped = out.split("Dropped combinations")[1].splitlines()[1:]
    assert dropped and all("torch==2.1.2" in line for line in dropped), dropped


# --- render --out ------------------------------------------------------------------------------------------

RENDER = ["--matrix", MATRIX, "render", "--only", "*torch:2.4.1-cpu-*"]


def _bad_outs(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    return {
        "file": str(tmp_path / "file"), "dev-null": "/dev/null", "missing-parent": str(tmp_path / "no" / "out"),
        "dangling-link": str(tmp_path / "dangling"), "empty": "", "blank": "  ", "link-to-dir": str(tmp_path / "link"),
        "foreign-files": str(tmp_path / "full"), "parent-is-file": str(tmp_path / "file" / "out"),
    }


@pytest.mark.parametrize("case", ["file", "dev-null", "missing-parent", "dangling-link", "empty", "blank",
                                  "link-to-dir", "foreign-files", "parent-is-file"])
def test_bad_out_is_a_usage_error_before_anything_is_written(tmp_path, capsys, case):
    out = _bad_outs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([*RENDER, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_out_on_an_unwritable_file_system_writes_nothing(capsys):
    assert main([*RENDER, "--out", "/proc/builder-render-out"]) == 2
    assert capsys.readouterr().err.startswith("error: --out /proc/builder-render-out")


def test_a_second_render_replaces_the_first_whole(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*RENDER, "--out", str(out)]) == 0
    (context,) = [p for p in out.iterdir() if p.is_dir()]
    (context / "smoke").mkdir()
    (context / "smoke" / "stale.py").write_text("old")
    (context / "sources" / "ca.pem").write_text("old secret")
    (out / "other-context").mkdir()
    assert main(["--matrix", MATRIX, "render", "--only", "*tensorflow:2.18.0-cpu-*", "--out", str(out)]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and any("tensorflow" in n for n in names) and ".builder-render" in names
    assert not list(out.rglob("stale.py")) and not list(out.rglob("ca.pem"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left beside it


def test_a_failure_part_way_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main([*RENDER, "--out", str(out)]) == 0
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def failing_write(self, target):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, target)

    original = render_module.BuildContext.write
    monkeypatch.setattr(render_module.BuildContext, "write", failing_write)
    assert main(["--matrix", MATRIX, "render", "--cuda", "12.1", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_context_directory_names_stay_short(tmp_path):
    text = (ROOT / "matrix.yaml").read_text().replace("repository: builder", "repository: " + "r" * 240)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(["--matrix", str(path), "render", "--only", "*torch:2.4.1-cpu-*", "--out", str(out)]) == 0
    assert all(len(p.name) <= 200 for p in out.iterdir())
    assert os.path.isfile(next(p for p in out.iterdir() if p.is_dir()) / "Dockerfile")


HOSTILE_VALUES = ["\x1b[2J\x1b[H", "a\nb", "\u2028", "x" * 5000, "\u0663.\u0661\u0661", "[", "*", "torch==\x1b", "==",
                  "torch==", "\x00", "$(id)", "-", "3.11\r"]


@pytest.mark.parametrize("flag", ["--cuda", "--python", "--framework", "--only", "--flavor"])
@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_selector_values_end_in_one_clean_line(no_engine, capsys, flag, value):
    try:
        code = main(["--matrix", MATRIX, "matrix", f"{flag}={value}", "--format", "json"])
    except SystemExit as exc:  # argparse: --flavor choices
        code = exc.code
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2 and flag != "--flavor":
        (line,) = err.strip().splitlines()
        assert line.startswith(("error: ", MATRIX)) and "\x1b" not in line and "\r" not in line and len(line) < 1000, line


@pytest.mark.parametrize("argv", [
    ["base", "deb\x1bian\n12"],
    ["matrix", "--shard", "1/\x1b[2J"],
    ["render", "--out", "/nonexistent/\x1b[2J\u2028/out"],
    ["certify", "--gpus", "\x1b[31m"],
])
def test_every_error_line_is_escaped_whoever_wrote_it(no_engine, capsys, argv):
    assert main(["--matrix", MATRIX, *argv]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert "\x1b" not in line and "\u2028" not in line, line
