"""The CUDA 13 devel cell, built for real from NVIDIA's wheels and certified: nvcc, a PyTorch CUDA extension and
torch.compile work in it, and it is the runtime image's layers plus the toolchain's. The one test that builds it.

Opt-in: it runs only with BUILDER_TEST_DEVEL=1. Two torch builds (devel, then runtime) and a certify took 190 s
on a 2-core machine with a warm package cache (2026-12-05), and take far longer with a cold one, more than CI's
time budget has left; run it by hand
(`BUILDER_TEST_DEVEL=1 BUILDER_TEST_REPOSITORY=NAME pytest tests/integration/test_devel.py`) after changing the
devel templates, the venv or toolchain layers, or the payload's devel checks."""

from __future__ import annotations

import os

import pytest

from builder.engine import Engine

from .conftest import REPOSITORY, Work

pytestmark = [pytest.mark.engine, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("BUILDER_TEST_DEVEL") != "1",
                                 reason="the CUDA 13 devel cell takes about 15 minutes: opt in with BUILDER_TEST_DEVEL=1")]

CELL = ["--framework", "torch==2.11.0", "--cuda", "13.0", "--python", "3.11"]
DEVEL_TAG = f"{REPOSITORY}/torch:2.11.0-cuda13.0-cudnn9.19-py3.11-devel-debian12"
RUNTIME_TAG = f"{REPOSITORY}/torch:2.11.0-cuda13.0-cudnn9.19-py3.11-runtime-debian12"


def layers(engine: Engine, tag: str) -> list[str]:
    return list(engine.api.inspect_image(tag)["RootFS"]["Layers"])


def test_cuda13_devel_builds_certifies_and_layers_over_runtime(work: Work, engine: Engine) -> None:
    work.cli("build", *CELL, "--flavor", "devel", "--force", check=True)
    # With the matrix's installer (the direct form) this build finds the devel build's steps in the layer cache;
    # in the builder-stage form (no installer) pip runs again, and the environment's layer must come out
    # byte-identical all the same (zeroed times, no .pyc), as it does when the two are built days apart.
    work.cli("build", "--only", RUNTIME_TAG, "--force", check=True)
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
