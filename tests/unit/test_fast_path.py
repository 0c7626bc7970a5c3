"""The no-op fast path before argparse: it reads a `build` command line exactly as argparse does (or leaves it to
argparse), notices every input that decides a cell's hash, and answers without loading the pipeline."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from builder import cli, labels, uptodate
from tests.unit.test_uptodate import _Engine, engine  # noqa: F401  (the fake engine fixture)

ROOT = Path(__file__).resolve().parents[2]
ENV = {"BUILDER_MATRIX": "m.yaml", "BUILDER_STATE": "st"}

# Command lines the fast path reads: its reading must be argparse's (matrix, state, selectors, jobs).
READ = [
    ["build"],
    ["--matrix", "x.yaml", "build"],
    ["--matrix=x.yaml", "--debug", "build", "--state", "s"],
    ["build", "--framework", "torch==2.4.1", "--cuda", "12.1", "--python", "3.11"],
    ["build", "--framework=torch==2.4.1", "--cuda=cpu", "--cuda", "12.1", "--cuda", "cpu"],
    ["build", "--only", "b/*", "--only", "a/*", "--flavor", "devel", "--flavor", "runtime"],
    ["build", "-j", "2", "--state", "a", "--state", "b"],
    ["build", "-j2", "--jobs", "7", "--fail-fast", "--no-proxy"],
    ["build", "--jobs=064", "--cache-dir", "/c", "--ca-bundle=/ca.pem", "--index-url", "http://i/",
     "--extra-index-url", "http://e/", "--find-links", "/w"],
    ["build", "--model-mirror", "http://m:8080", "--only", "x"],
]
# Command lines it must leave to argparse (which either rejects them or takes the full path).
LEFT = [
    [], ["certify"], ["build", "extra"], ["build", "build"], ["--version"], ["-h"], ["build", "--help"],
    ["build", "--force"], ["build", "--no-cache"], ["build", "--keep-stages"], ["build", "--force", "--only", "x"],
    ["build", "--frame", "torch"],  # argparse's abbreviation
    ["build", "--only"], ["build", "--only", "-x"], ["build", "--only", "--force"],
    ["build", "-j", "0"], ["build", "-j", "65"], ["build", "-j", "x"], ["build", "-j=2"], ["build", "-j"],
    ["build", "--flavor", "nightly"],
    ["--state", "s", "build"], ["build", "--matrix", "x.yaml"], ["--debug=1", "build"], ["build", "--no-proxy=1"],
    ["-j2", "build"], ["build", "--", "--only", "x"],
]


def _argparse_reading(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> uptodate.Invocation:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    args = cli.parser().parse_args(argv)
    return uptodate.Invocation(matrix=args.matrix, state=args.state, selectors=cli._selectors_of(args),
                               jobs=args.jobs)


@pytest.mark.parametrize("argv", READ, ids=" ".join)
def test_a_plain_build_line_is_read_as_argparse_reads_it(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert uptodate.parse_build(argv, ENV) == _argparse_reading(argv, monkeypatch)


@pytest.mark.parametrize("argv", LEFT, ids=" ".join)
def test_anything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert uptodate.parse_build(argv, ENV) is None


def test_no_option_of_build_is_forgotten() -> None:
    """A new `build` option must be sorted: read by the fast path, or left to argparse on purpose."""
    commands = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {s for action in commands.choices["build"]._actions for s in action.option_strings
               if s.startswith("--")}
    known = {"--help", "--force", "--no-cache", "--keep-stages", "--state", "--jobs", *uptodate.SELECTORS_OPTIONS,
             *uptodate._SOURCES, *uptodate._FLAGS}
    assert options == known


def test_the_key_follows_the_python_and_the_libraries_that_render(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("schema: 1\n")
    first = uptodate.key(matrix, [])
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert uptodate.key(matrix, []) != first
    monkeypatch.undo()
    site = tmp_path / "site"
    (site / "jinja2-99.0.dist-info").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    upgraded = uptodate.key(matrix, [])
    assert upgraded != first
    (site / "jinja2-99.0.dist-info").rename(site / "Jinja2-99.1.dist-info")
    assert uptodate.key(matrix, []) not in (first, upgraded)
    (site / "Jinja2-99.1.dist-info").rename(site / "requests-99.1.dist-info")  # not one that renders
    assert uptodate.key(matrix, []) == first


def test_the_key_follows_builders_own_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("schema: 1\n")
    package = tmp_path / "builder"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "0.1.0"\n')
    monkeypatch.setattr(uptodate, "PACKAGE", package)
    monkeypatch.setattr(uptodate, "TEMPLATES", tmp_path / "templates")
    first = uptodate.key(matrix, [])
    (package / "__init__.py").write_text('__version__ = "0.1.1"\n')
    assert uptodate.key(matrix, []) != first


def test_the_hash_label_is_the_one_builds_write() -> None:
    assert uptodate.HASH_LABEL == labels.HASH


HEAVY = ("docker", "jinja2", "pydantic", "yaml", "rich", "builder.matrix", "builder.render", "builder.build",
         "logging", "argparse", "signal")


def _run_fast(tmp_path: Path, sock: str, *extra: str) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from builder.cli import main; rc = main(sys.argv[1:]); "
            f"print('loaded', sorted(m for m in sys.modules if m in {HEAVY!r})); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "--matrix", str(tmp_path / "matrix.yaml"), "build",
                           "--only", "b/*", "--state", str(tmp_path / "state"), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{sock}",
                               "DOCKER_CONFIG": str(tmp_path)})


def test_ten_up_to_date_cells_in_eleven_questions_without_the_pipeline(tmp_path: Path, engine: _Engine) -> None:  # noqa: F811
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("schema: 1\n")
    cells = [uptodate.Stamped(tag=f"b/tf:{i}", content_hash=f"h{i}", base="debian:bookworm-slim",
                              base_id="sha256:base") for i in range(10)]
    for i in range(10):
        engine.answers[f"/images/b%2Ftf%3A{i}/json"] = {"Id": f"sha256:img{i}", "RepoTags": [f"b/tf:{i}"],
                                                        "Size": 10 ** 8, "Config": {"Labels": {uptodate.HASH_LABEL: f"h{i}"}}}
    uptodate.write_stamp(tmp_path / "state", uptodate.key(matrix, ["only=b/*"]), cells)
    done = _run_fast(tmp_path, engine.server_address)  # type: ignore[arg-type]
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"building 10 cell(s) with 1 job(s) on unix://{engine.server_address}\n"
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["CELL", "RESULT", "TIME", "SIZE", "IMAGE", "FETCHED", "FROM", "CACHE"]
    assert [line.split()[:3] for line in lines[1:11]] == [[f"b/tf:{i}", "up", "to"] for i in range(10)]
    assert lines[-1] == "loaded []"  # none of the pipeline, not even logging
    # One question for the base, one for each cell's image (more than INSPECT_MAX cells: one listing for all).
    assert engine.asked == ["/images/debian%3Abookworm-slim/json", *(f"/images/b%2Ftf%3A{i}/json" for i in range(10))]


def test_a_changed_matrix_or_force_takes_the_full_path(tmp_path: Path, engine: _Engine) -> None:  # noqa: F811
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("schema: 1\n")
    stamped = [uptodate.Stamped(tag="b/tf:1-cpu", content_hash="h1", base="debian:bookworm-slim",
                                base_id="sha256:base")]
    uptodate.write_stamp(tmp_path / "state", uptodate.key(matrix, ["only=b/*"]), stamped)
    for argv in (["build", "--only", "b/*", "--force"], ["build", "--only", "b/*", "--no-cache"]):
        assert uptodate.parse_build(argv, {}) is None
    matrix.write_text("schema: 1\n# edited\n")
    done = _run_fast(tmp_path, engine.server_address)  # type: ignore[arg-type]
    # The full path loaded the edited matrix (not a valid one) and said so; the fast path asked nothing.
    assert "up to date" not in done.stdout
    assert done.returncode != 0 and str(matrix) in done.stderr
    assert engine.asked == []
