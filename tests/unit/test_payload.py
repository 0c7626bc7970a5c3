"""The smoke payload, run directly on this host with whatever torch it has (CI installs the CPU wheel)."""

from __future__ import annotations

import json
import platform
import sys

import pytest

from builder.smoke import payload

torch = pytest.importorskip("torch")


def run(tmp_path, **claims_over):
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    base_version = torch.__version__.split("+")[0]
    cuda = torch.version.cuda
    cudnn = payload.decode_cudnn(torch.backends.cudnn.version()) if cuda else None
    claims = {"framework": "torch", "version": base_version, "python": py, "cuda": cuda, "cudnn": cudnn,
              **claims_over}
    (tmp_path / "cell.json").write_text(json.dumps(claims))
    out = tmp_path / "result.json"
    code = payload.main(["--claims", str(tmp_path / "cell.json"), "--out", str(out), "--steps", "120"])
    return code, json.loads(out.read_text())


def checks(result):
    return {c["name"]: c for c in result["checks"]}


def test_truthful_claims_pass_and_training_learns(tmp_path):
    code, result = run(tmp_path)
    assert code == 0 and result["ok"] and result["schema"] == payload.SCHEMA
    got = checks(result)
    for name in ("claims.python", "claims.framework", "train.cpu.mlp", "train.cpu.conv", "checkpoint"):
        assert got[name]["status"] == "pass", got[name]
    mlp = got["train.cpu.mlp"]["values"]
    assert mlp["last_loss"] < payload.LOSS_FRACTION["mlp"] * mlp["first_loss"]
    assert result["inventory"]["python"] == platform.python_version()
    assert result["inventory"]["pip_check"]["clean"] in (True, False)


def test_wrong_python_claim_is_named(tmp_path):
    code, result = run(tmp_path, python="3.8")
    assert code == 1 and not result["ok"]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert checks(result)["claims.python"]["detail"] == f"claims Python 3.8, runs {py}"


def test_claiming_cuda_on_a_build_without_it_fails(tmp_path):
    if torch.version.cuda:
        pytest.skip("this host's torch is a CUDA build")
    code, result = run(tmp_path, cuda="12.1", cudnn="9.1.0.70")
    got = checks(result)
    assert code == 1
    assert got["claims.cuda"]["detail"] == "claims CUDA 12.1, torch is built for no CUDA"
    assert got["claims.cudnn"]["detail"] == "claims cuDNN 9.1, torch loads none"


def test_wrong_framework_version_is_named(tmp_path):
    code, result = run(tmp_path, version="1.0.0")
    assert code == 1
    assert checks(result)["claims.framework"]["detail"].startswith("claims torch 1.0.0, imports ")


def test_missing_framework_fails_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    (tmp_path / "cell.json").write_text(json.dumps({"framework": "tensorflow", "version": "2.18.0", "python": "3.11",
                                                    "cuda": None, "cudnn": None}))
    out = tmp_path / "r.json"
    assert payload.main(["--claims", str(tmp_path / "cell.json"), "--out", str(out)]) == 1
    got = checks(json.loads(out.read_text()))
    assert got["import"]["status"] == "fail" and got["import"]["detail"].startswith("cannot import tensorflow")


@pytest.mark.parametrize(("number", "text"), [(8902, "8.9.2"), (90100, "9.1.0"), (91002, "9.10.2"), (None, None)])
def test_cudnn_numbers_decode(number, text):
    assert payload.decode_cudnn(number) == text


def test_gpu_path_is_skipped_and_said_so_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    _, result = run(tmp_path)
    assert checks(result)["gpu"]["status"] == "skip"
    assert not any(c["name"].startswith("gpu.") for c in result["checks"])


def test_gpu_path_runs_end_to_end_on_the_cpu_device(tmp_path):
    """The GPU checks' own code, pointed at the CPU (gloo for the all-reduce): all of it runs and passes."""
    import argparse

    report = payload.Report()
    inv = {"gpus": [{"name": "cpu stand-in", "capability": None, "memory_gb": 0}], "cudnn": None}
    args = argparse.Namespace(steps=80)
    payload.torch_gpu(torch, report, args, inv, device="cpu", world=2)
    got = {c["name"]: c for c in report.checks}
    for name in ("gpu.visible", "gpu.cudnn_conv", "gpu.matches_cpu", "gpu.train_mixed_precision",
                 "gpu.no_cpu_fallback", "gpu.matmul", "gpu.all_reduce"):
        assert got[name]["status"] == "pass", got[name]
    assert got["gpu.all_reduce"]["detail"] == "gloo all-reduce over 2 ranks gave [3.0, 3.0], expected 3.0"
    assert inv["mixed_precision_dtype"] == "bfloat16" and inv["matmul_tflops"]["n"] == 512
