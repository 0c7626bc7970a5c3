""".github/workflows/images.yml cannot run here; this is its dry run.

Every job's `run:` steps are executed by bash (as GitHub runs them: -e -o pipefail), in job order in one
folder, so what one job writes for the next (the plan) is there. `python`, `docker`, `sudo` and
`actionlint` are stand-ins that record their command lines; `python -m builder matrix` and `report` run
for real (they are pure and fast), the engine and registry commands are only recorded. Every recorded
`python -m builder ...` line must then parse with builder's own argparse parser, and the jobs must pass
what each needs from one to the next.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cli import parser
from builder.matrix import Selection, expand, load_matrix

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
REGISTRY = "localhost:5000/ci"
PASSWORD = "dry-run-password-0451"
SELECT = "--framework tensorflow --python 3.11"
SHARDS = 3
SHARD = 2
# Every ${{ }} expression that a run step or an env value may hold, and its value in the dry run.
EXPRESSIONS = {
    "vars.BUILDER_REGISTRY": REGISTRY,
    "inputs.select": SELECT,
    "inputs.shards || '4'": str(SHARDS),
    "matrix.shard": str(SHARD),
    "secrets.REGISTRY_USER": "ci",
    "secrets.REGISTRY_PASSWORD": PASSWORD,
}
JOBS = ("plan", "shard", "gpu", "report")

RECORDER = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["DRY_CALLS"], "a") as fh:
    fh.write(json.dumps({{"job": os.environ["DRY_JOB"], "argv": [{name!r}, *args]}}) + "\\n")
if {name!r} == "python" and args[:2] == ["-m", "builder"] and len(args) > 2 and args[2] in ("matrix", "report"):
    os.execv({python!r}, [{python!r}, *args])
if not sys.stdin.isatty():
    sys.stdin.read()  # docker login --password-stdin
"""


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def substitute(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        expr = match[1].strip()
        assert expr in EXPRESSIONS, f"images.yml: ${{{{ {expr} }}}} in a run step or env has no dry-run value"
        return EXPRESSIONS[expr]

    return re.sub(r"\$\{\{(.*?)\}\}", one, text)


def env_of(*blocks: dict[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for block in blocks:
        out.update({k: substitute(str(v)) for k, v in (block or {}).items()})
    return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("runner")
    shutil.copy(ROOT / "matrix.yaml", work / "matrix.yaml")
    bin_dir = work / ".stand-ins"
    bin_dir.mkdir()
    for name in ("python", "docker", "sudo", "actionlint"):
        path = bin_dir / name
        path.write_text(RECORDER.format(python=sys.executable, name=name))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    calls, outputs, summary = work / "calls.jsonl", work / "github-output", work / "step-summary.md"
    wf = workflow()
    steps_run: dict[str, int] = {}
    for job_name in JOBS:
        job = wf["jobs"][job_name]
        steps_run[job_name] = 0
        for step in job["steps"]:
            if "run" not in step:
                continue
            env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "BUILDER_"))}
            env.update(env_of(wf.get("env"), job.get("env"), step.get("env")))
            env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_CALLS=str(calls), DRY_JOB=job_name,
                       GITHUB_OUTPUT=str(outputs), GITHUB_STEP_SUMMARY=str(summary))
            result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                     substitute(step["run"])], cwd=work, env=env, capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL, timeout=120)
            assert result.returncode == 0, (f"images.yml: job {job_name}, step {step.get('name', step['run'][:40])!r} "
                                            f"failed in the dry run:\n{result.stdout}\n{result.stderr}")
            steps_run[job_name] += 1
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    return {"work": work, "calls": recorded, "outputs": outputs.read_text(), "summary": summary,
            "steps": steps_run}


def builder_calls(dry_run: dict[str, Any], job: str) -> list[list[str]]:
    return [c["argv"][3:] for c in dry_run["calls"]
            if c["job"] == job and c["argv"][:3] == ["python", "-m", "builder"]]


def only_tags(argv: list[str]) -> list[str]:
    return sorted(a.removeprefix("--only=") for a in argv if a.startswith("--only="))


def selected() -> list[str]:
    cells, _ = expand(load_matrix(str(ROOT / "matrix.yaml")), Selection(framework="tensorflow", python="3.11"))
    return sorted(c.tag for c in cells)


def plan(dry_run: dict[str, Any], k: int) -> list[dict[str, Any]]:
    return list(json.loads((dry_run["work"] / "plan" / f"shard-{k}.json").read_text())["include"])


# -------------------------------------------------------------------------------------------- tests
def test_every_job_ran_its_steps(dry_run: dict[str, Any]) -> None:
    assert all(dry_run["steps"][job] >= 2 for job in JOBS), dry_run["steps"]


def test_every_builder_command_line_parses(dry_run: dict[str, Any]) -> None:
    lines = [c for job in JOBS for c in builder_calls(dry_run, job)]
    assert len(lines) >= 12
    for argv in lines:
        try:
            args = parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"images.yml runs `python -m builder {' '.join(argv)}`, which builder's parser refuses")
        assert args.command in ("matrix", "base", "build", "certify", "push", "pull", "resolve", "report", "clean")


def test_plan_deals_the_selection_into_the_shards(dry_run: dict[str, Any]) -> None:
    assert f"shards={json.dumps(list(range(1, SHARDS + 1)), separators=(',', ':'))}" in dry_run["outputs"]
    dealt = sorted(c["tag"] for k in range(1, SHARDS + 1) for c in plan(dry_run, k))
    assert dealt == selected()
    matrix_calls = builder_calls(dry_run, "plan")
    assert [a[a.index("--shard") + 1] for a in matrix_calls] == [f"{k}/{SHARDS}" for k in range(1, SHARDS + 1)]
    assert all(a[0] == "matrix" and "--state" in a for a in matrix_calls)


def test_shard_builds_certifies_and_pushes_its_own_cells(dry_run: dict[str, Any]) -> None:
    mine = sorted(c["tag"] for c in plan(dry_run, SHARD))
    calls = builder_calls(dry_run, "shard")
    assert [a[0] for a in calls] == ["base", "build", "certify", "push"]
    assert all(only_tags(a) == mine for a in calls)
    certify = parser().parse_args(calls[2])
    assert certify.gpus == "none" and not certify.require_gpu
    push = parser().parse_args(calls[3])
    assert push.registry == REGISTRY and push.require == "cpu-verified"


def test_gpu_job_recertifies_pulled_cuda_cells_on_gpu_runners(dry_run: dict[str, Any]) -> None:
    job = workflow()["jobs"]["gpu"]
    assert "gpu" in job["runs-on"] and "self-hosted" in job["runs-on"]
    cuda = sorted(c["tag"] for c in plan(dry_run, SHARD) if c["cuda"] != "cpu")
    assert cuda, "the dry run's shard should hold a CUDA cell"
    calls = builder_calls(dry_run, "gpu")
    assert [a[0] for a in calls] == ["resolve", "pull", "certify", "push", "clean"]
    assert all(only_tags(a) == cuda for a in calls)
    certify = parser().parse_args(calls[2])
    assert certify.require_gpu and certify.gpus == "all" and certify.force
    assert parser().parse_args(calls[3]).require == "gpu-certified"
    assert parser().parse_args(calls[1]).registry == REGISTRY


def test_report_job_writes_the_page_and_the_step_summary(dry_run: dict[str, Any]) -> None:
    calls = builder_calls(dry_run, "report")
    assert [a[0] for a in calls] == ["report", "resolve", "resolve"]
    args = parser().parse_args(calls[0])
    assert (args.state, args.out) == (".builder", "report")
    assert " ".join(calls[0][1:5]) == SELECT  # the workflow's selection reaches the report
    assert (dry_run["work"] / "report" / "index.html").is_file()
    assert dry_run["summary"].read_text().startswith("## builder report")


def test_secrets_reach_only_docker_login_on_stdin(dry_run: dict[str, Any]) -> None:
    for call in dry_run["calls"]:
        assert PASSWORD not in " ".join(call["argv"]), call
    logins = [c["argv"] for c in dry_run["calls"] if c["argv"][:2] == ["docker", "login"]]
    assert logins and all(a == ["docker", "login", "localhost:5000", "-u", "ci", "--password-stdin"] for a in logins)


def test_actions_are_pinned_to_a_major_version() -> None:
    for name, job in workflow()["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"actions/[a-z-]+(/[a-z]+)?@v[0-9]+", step["uses"]), (name, step["uses"])


def test_actionlint() -> None:
    """actionlint (pip install -e '.[actionlint]'), where its binary could be fetched at install time."""
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if found is None:
        pytest.skip("actionlint is not installed: `pip install -e '.[actionlint]'` downloads it from GitHub releases")
    result = subprocess.run([found, "-no-color", str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
