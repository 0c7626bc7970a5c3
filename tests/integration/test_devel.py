"""The CUDA 13 devel cell, built for real from NVIDIA's wheels and certified: nvcc, a PyTorch CUDA extension and
torch.compile work in it, and it is the runtime image's layers plus the toolchain's. The one test that builds it."""

from __future__ import annotations

import pytest

from builder.engine import Engine

from .conftest import REPOSITORY, Work

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CELL = ["--framework", "torch==2.11.0", "--cuda", "13.0", "--python", "3.11"]
DEVEL_TAG = f"{REPOSITORY}/torch:2.11.0-cuda13.0-cudnn9.19-py3.11-devel-debian12"
RUNTIME_TAG = f"{REPOSITORY}/torch:2.11.0-cuda13.0-cudnn9.19-py3.11-runtime-debian12"


def layers(engine: Engine, tag: str) -> list[str]:
    return list(engine.api.inspect_image(tag)["RootFS"]["Layers"])


def test_cuda13_devel_builds_certifies_and_layers_over_runtime(work: Work, engine: Engine) -> None:
    work.cli("build", *CELL, "--flavor", "devel", check=True)
    work.cli("build", "--only", RUNTIME_TAG, check=True)  # from the same layer cache: the shared layers
    devel, runtime = layers(engine, DEVEL_TAG), layers(engine, RUNTIME_TAG)
    # Every runtime layer but its last (cell.json, which names the flavor) is the devel image's own.
    shared = runtime[:-1]
    assert devel[: len(shared)] == shared, "the devel image does not continue from the runtime image's layers"
    assert len(devel) > len(runtime)

    proc = work.cli("certify", "--only", DEVEL_TAG)
    cert = work.certificate(DEVEL_TAG)
    checks = {c["name"]: c for c in cert["checks"]}
    for name in ("devel.cuda_version", "devel.nvcc", "devel.cpp_extension", "compile.torch"):
        assert checks[name]["status"] == "pass", (name, checks[name], proc.stderr[-2000:])
    assert "sm_90" in checks["devel.nvcc"]["values"]["arches"]
    assert checks["devel.cpp_extension"]["values"]["arch_list"] == "9.0"
    assert "unverified until a GPU host" in checks["devel.nvcc"]["values"]["gpu_run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
