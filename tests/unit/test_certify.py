"""Certification decisions that need no engine: levels, driver checks, GPU requests, digests."""

from __future__ import annotations

import dataclasses

import pytest

from builder.certify import digest, driver_shortfall, plan_gpus, staleness
from builder.gpu import DriverProbe, gpu_paths, parse_nvidia_smi, parse_proc_version, probe_local
from builder.verdict import decide

from .golden import cell


def result(*checks: tuple[str, str]) -> dict:
    return {"checks": [{"name": n, "status": s, "detail": f"{n} detail", "values": {}} for n, s in checks]}


def test_all_cpu_checks_pass_is_cpu_verified():
    out = decide(result(("claims.cuda", "pass"), ("train.cpu.mlp", "pass"), ("gpu", "skip")), 0, requested=False,
                 require_gpu=False)
    assert (out.level, out.reasons) == ("cpu-verified", [])


def test_gpu_checks_passing_without_a_request_are_not_gpu_certified():
    # A GPU seen by accident (a default nvidia runtime) proves nothing that was asked for.
    out = decide(result(("train.cpu.mlp", "pass"), ("gpu.cudnn_conv", "pass")), 0, requested=False, require_gpu=False)
    assert out.level == "cpu-verified"


def test_any_failed_check_fails_and_is_named():
    out = decide(result(("claims.cudnn", "fail"), ("train.cpu.mlp", "pass")), 1, requested=False, require_gpu=False)
    assert out.level == "failed" and out.reasons == ["claims.cudnn: claims.cudnn detail"]


def test_no_result_and_timeout_fail():
    kw = {"requested": False, "require_gpu": False}
    assert decide(None, 127, **kw).reasons == ["the payload wrote no result (exit 127)"]
    assert decide(None, None, **kw).reasons == ["the payload timed out"]
    assert decide(result(("train.cpu.mlp", "pass")), 3, **kw).reasons == ["the payload exited with 3"]


def test_require_gpu_without_gpu_checks_is_noted():
    out = decide(result(("train.cpu.mlp", "pass"), ("gpu", "skip")), 0, requested=False, require_gpu=True)
    assert out.level == "cpu-verified" and out.gpu_note and "--require-gpu" in out.gpu_note


@pytest.mark.parametrize(("driver", "usable", "note"), [
    (None, True, None),
    ("550.54.14", True, None),
    ("530.30.02", True, None),
    ("525.60.13", True, "minor-version compatibility"),
    ("470.82.01", False, "older than 525"),
])
def test_host_driver_against_the_cells_minimum(driver, usable, note):
    ok, text = driver_shortfall(cell("torch-2.4.1-cuda12.1-py3.11"), driver)
    assert ok is usable
    assert (text is None) if note is None else (note in text)


def test_cpu_cells_need_no_driver():
    assert driver_shortfall(cell("torch-2.4.1-cpu-py3.11"), "390.1") == (True, None)


H200 = DriverProbe(version="550.54.14", gpus=("NVIDIA H200",), error=None, source="probe")


@pytest.mark.parametrize(("option", "paths", "probe", "count", "words"), [
    ("none", {"runtime"}, H200, None, None),
    ("auto", set(), None, None, "no NVIDIA runtime, hook or CDI device"),
    ("auto", {"runtime"}, H200, -1, None),
    ("auto", set(), H200, -1, None),  # the hook: only the probe shows it
    ("auto", set(), DriverProbe(version=None, gpus=(), error="nvidia-smi exited 9: NVIDIA-SMI has failed",
                                source="probe"), None, "NVIDIA-SMI has failed"),
    ("all", {"runtime"}, None, -1, None),
    ("2", {"cdi"}, H200, 2, None),
])
def test_plan_gpus(option, paths, probe, count, words):
    plan = plan_gpus(option, paths, probe, "unix:///var/run/docker.sock")
    assert (plan.request.count if plan.request else None) == count
    assert plan.requested is (count is not None)
    if words:
        assert words in plan.note


def test_plan_gpus_refuses_an_explicit_request_the_engine_cannot_serve():
    plan = plan_gpus("all", set(), None, "tcp://gpu-host:2375")
    assert not plan.requested and "tcp://gpu-host:2375 cannot hand out GPUs" in plan.error


@pytest.mark.parametrize(("code", "out", "version", "gpus", "error"), [
    (0, "550.54.14, NVIDIA H200\n550.54.14, NVIDIA H200\n", "550.54.14", 2, None),
    (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
        "NVIDIA driver is installed and running.\n", None, 0, "nvidia-smi exited 9: NVIDIA-SMI has failed"),
    (0, "NVIDIA-SMI has failed because it couldn't communicate\n", None, 0, "not 'driver_version, name'"),
    (0, "", None, 0, "listed no GPU"),
    (127, "sh: 1: nvidia-smi: not found\n", None, 0, "exited 127"),
    (0, "550.54.14, A\n535.104.05, B\n", None, 2, "several drivers"),
    (0, "\uff15\uff15\uff10.54.14, NVIDIA H200\n", None, 0, "not 'driver_version, name'"),  # fullwidth digits
])
def test_nvidia_smi_output_is_read_strictly(code, out, version, gpus, error):
    probe = parse_nvidia_smi(code, out, "", "test")
    assert probe.version == version and len(probe.gpus) == gpus
    assert (probe.error is None) if error is None else (error in probe.error)


def test_local_probe_uses_the_exit_code_and_falls_back_to_the_kernel_module(tmp_path):
    class Done:
        returncode, stdout, stderr = 9, "NVIDIA-SMI has failed because it couldn't communicate\n", ""

    failing = probe_local(run=lambda cmd: Done(), which=lambda name: "/usr/bin/nvidia-smi")
    assert failing.version is None and "exited 9" in failing.error
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n")
    assert probe_local(which=lambda name: None, proc=str(proc)).version == "550.54.14"
    none = probe_local(which=lambda name: None, proc=str(tmp_path / "missing"))
    assert none.version is None and "no NVIDIA kernel module" in none.error
    assert parse_proc_version("garbage", "x").version is None


@pytest.mark.parametrize(("info", "paths"), [
    ({"Runtimes": {"runc": {}}}, set()),
    ({"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}}, {"runtime"}),
    ({"Runtimes": {"runc": {}}, "DefaultRuntime": "nvidia"}, {"runtime"}),
    # docker info of Engine 28.2 with the NVIDIA CDI specs generated (nvidia-ctk cdi generate)
    ({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
      "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=0"}, {"Source": "cdi", "ID": "nvidia.com/gpu=all"}]},
     {"cdi"}),
    # Engine 28 with CDI spec dirs but no NVIDIA spec in them
    ({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi"], "DiscoveredDevices": []}, set()),
    ({"Runtimes": {"runc": {}}, "DiscoveredDevices": [{"Source": "cdi", "ID": "amd.com/gpu=0"}]}, set()),
])
def test_gpu_paths_from_docker_info(info, paths):
    assert gpu_paths(info) == paths


def test_staleness_names_what_changed():
    plan = plan_gpus("none", set(), None, "x")
    cert = {"image": {"id": "sha256:a"}, "payload": {"digest": "sha256:p"}, "digest": "sha256:c",
            "host": {"gpus_requested": None}}
    assert staleness(cert, "sha256:a", "sha256:c", "sha256:p", plan) is None
    assert staleness(None, "sha256:a", "sha256:c", "sha256:p", plan) == "no certificate"
    assert "another build" in staleness(cert, "sha256:b", "sha256:c", "sha256:p", plan)
    assert "older payload" in staleness(cert, "sha256:a", "sha256:c", "sha256:q", plan)
    assert "stamp" in staleness(cert, "sha256:a", "sha256:x", "sha256:p", plan)
    gpu_plan = plan_gpus("auto", {"runtime"}, H200, "x")
    assert "GPUs are requested now" in staleness(cert, "sha256:a", "sha256:c", "sha256:p", gpu_plan)


def test_digest_covers_everything_but_itself():
    cert = {"level": "cpu-verified", "checks": [1, 2]}
    first = digest(cert)
    assert first == digest({**cert, "digest": "whatever"})
    assert first != digest({**cert, "level": "failed"})
    assert first.startswith("sha256:") and len(first) == 71


def test_unused_fields_do_not_change_cells():
    c = cell("torch-2.4.1-cuda12.1-py3.11")
    assert dataclasses.replace(c).tag == c.tag
