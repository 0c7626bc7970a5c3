"""The GPU request path on a real engine with no GPU: the NVIDIA hook stand-in (tests/fixtures/nvidia-hook) makes
dockerd serve GPU requests as on a host with the NVIDIA Container Toolkit, and the containers simply get none.
`.ci/run` starts the engine that way; elsewhere these tests skip unless BUILDER_TEST_GPU_HOOK asks for them."""

from __future__ import annotations

import os

import pytest

from builder.engine import GpuRequest

from .conftest import TORCH, TORCH_TAG, managed_containers

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def hook(engine, torch_built) -> str:
    """The tested torch image id, on an engine that serves GPU requests through the hook."""
    image_id = torch_built["image_id"]
    if engine.gpu_probe(image_id, GpuRequest(count=-1)) is None:
        if os.environ.get("BUILDER_TEST_GPU_HOOK"):
            pytest.fail("the engine refuses GPU requests: was dockerd started with tests/fixtures/nvidia-hook on "
                        "its PATH?")
        pytest.skip("this engine has no NVIDIA runtime, hook or CDI (start dockerd with tests/fixtures/nvidia-hook "
                    "first on its PATH to run these)")
    return image_id


def env_in(engine, image_id: str, gpus: GpuRequest | None) -> str:
    run = engine.run(image_id, ["sh", "-c", "echo NVD=$NVIDIA_VISIBLE_DEVICES"], labels={}, timeout=60,
                     mem_limit="256m", gpus=gpus)
    assert run.exit_code == 0, run.logs
    return run.logs.strip()


def test_runs_without_gpus_are_told_void_and_requests_reach_the_hook(engine, hook):
    # The images say NVIDIA_VISIBLE_DEVICES=all; a run without GPUs must override it, or a host whose default
    # runtime is nvidia would hand it every GPU.
    assert env_in(engine, hook, None) == "NVD=void"
    assert env_in(engine, hook, GpuRequest(count=-1)) == "NVD=all"
    probe = engine.gpu_probe(hook, GpuRequest(count=-1))
    assert probe.version is None and "nvidia-smi exited 127" in probe.error  # the hook gave no driver
    assert managed_containers(engine) == []


def test_auto_on_a_host_with_the_toolkit_and_no_gpu_does_not_request_one(engine, work, hook):
    proc = work.cli("certify", *TORCH, "--force")
    assert proc.returncode == 0, proc.stderr
    cert = work.certificate(TORCH_TAG)
    assert cert["level"] == "cpu-verified" and cert["host"]["gpu_paths"] == ["hook"]
    assert cert["host"]["gpus_requested"] is None
    assert any("can hand out GPUs (hook) but its host shows none" in n for n in cert["notes"])


def test_gpus_asked_for_and_not_seen_fail_naming_the_cause(engine, work, hook):
    proc = work.cli("certify", *TORCH, "--gpus", "all")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cert = work.certificate(TORCH_TAG)
    assert cert["level"] == "failed" and cert["host"]["gpus_requested"] == -1
    visible = next(c for c in cert["checks"] if c["name"] == "gpu.visible")
    assert visible["status"] == "fail"
    assert cert["reasons"][0].startswith("gpu.visible")
    assert not [c for c in cert["checks"] if c["name"].startswith("gpu.") and c["status"] == "pass"]
    assert engine.image(TORCH_TAG).labels["org.builder.certificate.level"] == "failed"
    assert managed_containers(engine) == []
    # and the image is still fine where no GPU is asked for: certify again without one
    again = work.cli("certify", *TORCH, "--gpus", "none")
    assert again.returncode == 0 and work.certificate(TORCH_TAG)["level"] == "cpu-verified"
