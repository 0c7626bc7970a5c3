"""doctor: what a host can run, from fakes of nvidia-smi and of the engine (no GPU on these machines)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import doctor
from builder.errors import EngineError
from builder.gpu import DriverProbe, probe_local
from builder.matrix import Selection, expand, load_matrix
from builder.state import State

from .fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
SMI_FAILED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
              "latest NVIDIA driver is installed and running.\n")


def smi(returncode: int, stdout: str = "", stderr: str = "") -> DriverProbe:
    """probe_local as it goes on a host whose nvidia-smi prints this."""
    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    return probe_local(run=run, which=lambda name: "/usr/bin/nvidia-smi")


NO_DRIVER = probe_local(which=lambda name: None, proc="/nonexistent/nvidia/version")
GOOD = smi(0, "550.54.14, NVIDIA H100 80GB HBM3\n550.54.14, NVIDIA H100 80GB HBM3\n")
OLD = smi(0, "470.82.01, Tesla T4\n")
NVIDIA_INFO = {"Runtimes": {"runc": {}, "nvidia": {}}, "ServerVersion": "27.1.1"}
LOCAL = "unix:///var/run/docker.sock"


@pytest.fixture
def cells(write_matrix):
    found, _ = expand(load_matrix(write_matrix()), Selection())
    return {(c.framework, c.version, c.cuda or "cpu", c.python, c.base.name): c for c in found}


def torch121(cells):
    return cells[("torch", "2.4.1", "12.1", "3.11", "debian12")]


def report_for(cells, state_dir, *, engine: FakeEngine | None, local: DriverProbe, with_image: bool = True):
    if engine is not None and with_image:
        engine.add_image("example/ml/torch:anything", labels={"org.builder.managed": "true"})

    def connect() -> FakeEngine:
        if engine is None:
            raise EngineError("no Docker engine answers at unix:///var/run/docker.sock (refused): start one")
        return engine

    return doctor.run(list(cells.values()), state_dir=state_dir, connect=connect, local=lambda: local)


def verdicts(report) -> dict[str, doctor.Verdict]:
    return {v.tag: v for v in report.verdicts}


def test_failing_nvidia_smi_is_an_error_not_a_driver(cells, tmp_path):
    """exit 9 'couldn't communicate with the NVIDIA driver': every CUDA cell is 'no', with nvidia-smi's words."""
    probe = smi(9, SMI_FAILED)
    assert probe.version is None
    report = report_for(cells, tmp_path, engine=FakeEngine(address=LOCAL, docker_info=NVIDIA_INFO, probe=probe), local=probe)
    v = verdicts(report)[torch121(cells).tag]
    assert v.gpu == "no"
    assert "nvidia-smi exited 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver" in v.why
    assert "runs on the CPU only" in v.why
    text = doctor.render_text(report)
    assert "NVIDIA-SMI has failed" in text and "driver NVIDIA" not in text


def test_no_gpu_host_tells_the_truth(cells, tmp_path):
    report = report_for(cells, tmp_path, engine=FakeEngine(address=LOCAL, probe=None), local=NO_DRIVER)
    v = verdicts(report)
    assert {x.gpu for t, x in v.items() if "-cpu-" not in t} == {"no"}
    assert all("no nvidia-smi and no NVIDIA kernel module" in x.why for t, x in v.items() if "-cpu-" not in t)
    cpu = next(x for t, x in v.items() if "-cpu-" in t)
    assert cpu.gpu == "cpu cell"
    assert report.engine.probe_note == "the engine refused a GPU request: no NVIDIA runtime, hook or CDI device"
    text = doctor.render_text(report)
    assert "GPUs handed out through: none" in text and "GPUs           none" in text


def test_good_driver_and_runtime_run_every_cuda_cell(cells, tmp_path):
    report = report_for(cells, tmp_path, engine=FakeEngine(address=LOCAL, docker_info=NVIDIA_INFO, probe=GOOD), local=GOOD)
    v = verdicts(report)[torch121(cells).tag]
    assert v.gpu == "yes"
    assert v.why == "driver 550.54.14 >= 525, 2 GPU(s) through the NVIDIA runtime"
    assert report.driver == GOOD


def test_hook_without_a_runtime_is_found_by_the_probe(cells, tmp_path):
    engine = FakeEngine(address=LOCAL, docker_info={"Runtimes": {"runc": {}}}, probe=GOOD)
    report = report_for(cells, tmp_path, engine=engine, local=NO_DRIVER)
    assert report.engine.paths == ("hook",)
    assert verdicts(report)[torch121(cells).tag].why.endswith("through the NVIDIA hook")
    assert engine.calls[0][0] == "gpu_probe"
    assert report.driver == GOOD  # the engine host's driver, not this machine's (none)


def test_driver_without_a_way_into_containers_says_install_the_toolkit(cells, tmp_path):
    report = report_for(cells, tmp_path, engine=FakeEngine(address=LOCAL, probe=None), local=GOOD)
    v = verdicts(report)[torch121(cells).tag]
    assert v.gpu == "no" and "no NVIDIA runtime, hook or CDI device: install the NVIDIA Container Toolkit" in v.why


def _certify(state: State, tag: str, level: str, **cell) -> None:
    cert = {"image": {"id": "sha256:" + "1" * 64}, "level": level, "digest": "sha256:" + "2" * 64,
            "time": "2026-01-01T00:00:00Z", "cell": cell}
    state.write_certificate(tag, cert)
    state.index_certificate(tag, cert)


def test_too_old_driver_names_the_newest_certified_tag_it_can_run(cells, tmp_path):
    state = State(tmp_path)
    _certify(state, "ex/torch:2.1.2-cuda11.8-py3.11", "cpu-verified", framework="torch", version="2.1.2",
             python="3.11", cuda="11.8", driver_floor="450")
    _certify(state, "ex/torch:2.4.1-cuda11.8-py3.11", "gpu-certified", framework="torch", version="2.4.1",
             python="3.11", cuda="11.8", driver_floor="450")
    _certify(state, "ex/torch:2.5.1-cuda12.4-py3.11", "gpu-certified", framework="torch", version="2.5.1",
             python="3.11", cuda="12.4", driver_floor="525")  # newer, but this driver cannot run it
    _certify(state, "ex/torch:2.6.0-cuda11.8-py3.11", "failed", framework="torch", version="2.6.0",
             python="3.11", cuda="11.8", driver_floor="450")  # runnable, but not certified
    _certify(state, "ex/tensorflow:2.20.0-cuda11.8-py3.11", "gpu-certified", framework="tensorflow",
             version="2.20.0", python="3.11", cuda="11.8", driver_floor="450")  # another framework
    report = report_for(cells, tmp_path, engine=FakeEngine(address=LOCAL, docker_info=NVIDIA_INFO, probe=OLD), local=OLD)
    v = verdicts(report)[torch121(cells).tag]
    assert v.gpu == "no"
    assert v.why.startswith("driver 470.82.01 is older than 525, the oldest that runs CUDA 12.1")
    assert v.instead == "ex/torch:2.4.1-cuda11.8-py3.11 (gpu-certified, needs driver 450, local)"
    assert f"instead of {v.tag}: ex/torch:2.4.1-cuda11.8-py3.11" in doctor.render_text(report)


def test_too_old_driver_with_nothing_certified_says_so(cells, tmp_path):
    report = report_for(cells, tmp_path, engine=FakeEngine(address=LOCAL, docker_info=NVIDIA_INFO, probe=OLD), local=OLD)
    v = verdicts(report)[torch121(cells).tag]
    assert v.instead is None and "no certified image of torch that this driver runs is known" in v.why


def test_unreachable_engine_is_reported_and_exits_3(cells, tmp_path, capsys, monkeypatch):
    report = report_for(cells, tmp_path, engine=None, local=GOOD)
    assert report.engine.error and all(v.why.startswith("no engine:") for v in report.verdicts)
    monkeypatch.setattr(doctor, "run", lambda *a, **k: report)
    assert doctor.main([], state_dir=tmp_path, registry=None, fmt="table") == EngineError.exit_code
    assert "engine         unreachable: no Docker engine answers" in capsys.readouterr().out


def test_remote_engine_without_a_probe_does_not_borrow_this_machines_driver(cells, tmp_path):
    engine = FakeEngine(address="tcp://10.0.0.2:2375", docker_info=NVIDIA_INFO, probe=GOOD)
    report = report_for(cells, tmp_path, engine=engine, local=GOOD, with_image=False)
    v = verdicts(report)[torch121(cells).tag]
    assert v.gpu == "unknown" and "is not this machine" in v.why
    refusing = FakeEngine(address="tcp://10.0.0.2:2375", probe=None)
    v = verdicts(report_for(cells, tmp_path, engine=refusing, local=GOOD))[torch121(cells).tag]
    assert v.gpu == "no" and "cannot hand out GPUs" in v.why


def test_registry_without_resolve_is_named(cells, tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_publish(name: str, *a):
        if name == "builder.publish":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(doctor.importlib, "import_module", no_publish)
    found, note = doctor.registry_candidates("localhost:5000", list(cells.values()), "470.82.01")
    assert found == [] and "has no `resolve`" in note


def test_registry_candidates_come_from_resolve_for_cells_the_driver_runs(cells, tmp_path, monkeypatch):
    """resolve is asked only about cells this driver can run; what it certifies becomes the fallback."""
    import types

    asked: list[list[str]] = []
    old_line = next(c for c in cells.values() if c.cuda == "12.1")
    runnable = dataclasses.replace(old_line, driver_floor="450", cuda="11.8")

    def resolve_cells(wanted, registry, require):
        asked.append([c.tag for c in wanted])
        return [types.SimpleNamespace(cell=c, ok=True, level="gpu-certified",
                                      reference=f"{registry}/x@sha256:{'a' * 64}") for c in wanted]

    monkeypatch.setitem(sys.modules, "builder.publish", types.SimpleNamespace(resolve_cells=resolve_cells))
    found, note = doctor.registry_candidates("localhost:5000", [*cells.values(), runnable], "470.82.01")
    assert asked == [[runnable.tag]]  # every matrix cell needs 525: only the 11.8 one is worth a lookup
    assert [(c.tag, c.where) for c in found] == [(runnable.tag, f"localhost:5000/x@sha256:{'a' * 64}")]
    assert note == "--registry localhost:5000: 1 of 1 cell(s) this driver runs are certified there"
    v = doctor.verdict(torch121(cells), doctor.EngineFacts(address=LOCAL, paths=("runtime",)), OLD, None, found)
    assert v.instead == f"{runnable.tag} (gpu-certified, needs driver 450, localhost:5000/x@sha256:{'a' * 64})"


def test_cli_with_a_failing_nvidia_smi_and_no_engine(tmp_path):
    """The real command, a fake nvidia-smi on PATH that fails like a host whose driver is gone, no engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '%s' \"{SMI_FAILED.strip()}\"\nexit 9\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    proc = subprocess.run([sys.executable, "-m", "builder", "doctor", "--framework", "torch==2.4.1", "--cuda", "12.1",
                           "--state", str(tmp_path / "state")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "nvidia-smi exited 9: NVIDIA-SMI has failed because it couldn't communicate" in proc.stdout
    assert "engine         unreachable" in proc.stdout
