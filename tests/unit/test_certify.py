"""Certification decisions that need no engine: levels, driver checks, GPU requests, digests."""

from __future__ import annotations

import dataclasses

import pytest

from builder.certify import decide, digest, driver_shortfall, gpu_request

from .golden import cell


def result(*checks: tuple[str, str]) -> dict:
    return {"checks": [{"name": n, "status": s, "detail": f"{n} detail", "values": {}} for n, s in checks]}


def test_all_cpu_checks_pass_is_cpu_verified():
    out = decide(result(("claims.cuda", "pass"), ("train.cpu.mlp", "pass"), ("gpu", "skip")), 0, None, False)
    assert (out.level, out.reasons) == ("cpu-verified", [])


def test_gpu_checks_passing_with_gpus_requested_is_gpu_certified():
    out = decide(result(("train.cpu.mlp", "pass"), ("gpu.cudnn_conv", "pass")), 0, -1, False)
    assert out.level == "gpu-certified"


def test_any_failed_check_fails_and_is_named():
    out = decide(result(("claims.cudnn", "fail"), ("train.cpu.mlp", "pass")), 1, None, False)
    assert out.level == "failed" and out.reasons == ["claims.cudnn: claims.cudnn detail"]


def test_no_result_and_timeout_fail():
    assert decide(None, 127, None, False).reasons == ["the payload wrote no result (exit 127)"]
    assert decide(None, None, None, False).reasons == ["the payload timed out"]
    assert decide(result(("train.cpu.mlp", "pass")), 3, None, False).reasons == ["the payload exited with 3"]


def test_require_gpu_without_gpu_checks_is_noted():
    out = decide(result(("train.cpu.mlp", "pass"), ("gpu", "skip")), 0, None, True)
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


def test_gpu_request():
    assert gpu_request("none", {"nvidia", "runc"}) is None
    assert gpu_request("auto", {"runc"}) is None
    assert gpu_request("auto", {"nvidia", "runc"}) == -1
    assert gpu_request("all", {"runc"}) == -1
    assert gpu_request("2", {"nvidia"}) == 2


def test_digest_covers_everything_but_itself():
    cert = {"level": "cpu-verified", "checks": [1, 2]}
    first = digest(cert)
    assert first == digest({**cert, "digest": "whatever"})
    assert first != digest({**cert, "level": "failed"})
    assert first.startswith("sha256:") and len(first) == 71


def test_unused_fields_do_not_change_cells():
    c = cell("torch-2.4.1-cuda12.1-py3.11")
    assert dataclasses.replace(c).tag == c.tag
