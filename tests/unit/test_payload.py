"""The smoke payload, run directly on this host with whatever torch it has (CI installs the CPU wheel)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import pytest

from builder.smoke import payload

torch = pytest.importorskip("torch")


def truthful_claims(**over):
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    cuda = torch.version.cuda
    cudnn = payload.decode_cudnn(torch.backends.cudnn.version()) if cuda else None
    return {"framework": "torch", "version": torch.__version__.split("+")[0], "python": py, "cuda": cuda,
            "cudnn": cudnn, **over}


def run_main(tmp_path, *argv, **claims_over):
    (tmp_path / "cell.json").write_text(json.dumps(truthful_claims(**claims_over)))
    out = tmp_path / "result.json"
    code = payload.main(["--claims", str(tmp_path / "cell.json"), "--out", str(out), "--compile", "off", *argv])
    return code, json.loads(out.read_text())


def checks(result):
    return {c["name"]: c for c in (result["checks"] if isinstance(result, dict) else result)}


@pytest.fixture(scope="module")
def truthful(tmp_path_factory):
    return run_main(tmp_path_factory.mktemp("truthful"), "--steps", "80")


def test_truthful_claims_pass_and_training_learns(truthful):
    code, result = truthful
    assert code == 0 and result["ok"] and result["schema"] == payload.SCHEMA
    assert result["payload_version"] == payload.payload_version()
    got = checks(result)
    for name in ("claims.python", "claims.framework", "train.cpu.mlp", "train.cpu.conv", "checkpoint"):
        assert got[name]["status"] == "pass", got[name]
    mlp = got["train.cpu.mlp"]["values"]
    assert mlp["last_loss"] < payload.LOSS_FRACTION["mlp"] * mlp["first_loss"]
    assert result["inventory"]["python"] == platform.python_version()
    assert result["inventory"]["pip_check"]["clean"] in (True, False)
    assert result["inventory"]["packages"]["torch"] == torch.__version__


def claims_of(truthful, **over):
    report = payload.Report()
    payload.check_claims(report, truthful_claims(**over), truthful[1]["inventory"], "torch")
    return checks(report.checks)


def test_wrong_python_claim_is_named(truthful):
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    got = claims_of(truthful, python="3.8")["claims.python"]
    assert got["status"] == "fail" and got["detail"] == f"claims Python 3.8, runs {py}"


def test_claiming_cuda_on_a_build_without_it_fails(truthful):
    if torch.version.cuda:
        pytest.skip("this host's torch is a CUDA build")
    got = claims_of(truthful, cuda="12.1", cudnn="9.1.0.70")
    assert got["claims.cuda"]["detail"] == "claims CUDA 12.1, torch is built for no CUDA"
    assert got["claims.cudnn"]["detail"] == "claims cuDNN 9.1, torch loads none"
    assert got["claims.cuda"]["status"] == got["claims.cudnn"]["status"] == "fail"


def test_wrong_framework_version_is_named(truthful):
    got = claims_of(truthful, version="1.0.0")["claims.framework"]
    assert got["status"] == "fail" and got["detail"].startswith("claims torch 1.0.0, imports ")


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


def test_gpu_path_is_skipped_and_said_so_without_a_gpu(truthful):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    got = checks(truthful[1])
    assert got["gpu"]["status"] == "skip" and "no GPU visible to torch" in got["gpu"]["detail"]
    assert not any(name.startswith("gpu.") for name in got)


def test_gpu_required_but_not_visible_fails_naming_the_cause(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    code, result = run_main(tmp_path, "--steps", "2", "--gpu", "require")
    got = checks(result)["gpu.visible"]
    assert code == 1 and got["status"] == "fail"
    assert got["detail"].startswith("GPUs were requested but torch sees none: driver probe:")
    assert "NVIDIA_VISIBLE_DEVICES='void'" in got["values"]["causes"]
    if torch.version.cuda is None:
        assert "CPU-only build of torch (torch.version.cuda is None)" in got["values"]["causes"]
        assert "torch.cuda.init(): AssertionError: Torch not compiled with CUDA enabled" in got["values"]["causes"]


def test_gpu_path_runs_end_to_end_on_the_cpu_device():
    """The GPU checks' own code, pointed at the CPU (gloo for the all-reduce): all of it runs and passes."""
    report = payload.Report()
    inv = {"gpus": [], "cudnn": None, "arch_list": []}
    payload.torch_gpu(torch, report, argparse.Namespace(steps=40, all_reduce_timeout=60), inv, device="cpu", world=2)
    got = checks(report.checks)
    for name in ("gpu.cudnn_conv", "gpu.matches_cpu", "gpu.tf32_off", "gpu.bf16_native", "gpu.train_mixed_precision",
                 "gpu.no_cpu_fallback", "gpu.matmul", "gpu.linalg", "gpu.device_assert", "gpu.all_reduce"):
        assert got[name]["status"] == "pass", got[name]
    for name in ("gpu.arch_supported", "gpu.cudnn_runtime_vs_compile", "gpu.h2d_bandwidth"):
        assert got[name]["status"] == "skip", got[name]
    assert got["gpu.all_reduce"]["detail"].startswith("gloo all-reduce over 2 ranks gave [3.0, 3.0], expected 3.0; 4 MiB")
    assert got["gpu.all_reduce"]["values"]["busbw_gbps"] == pytest.approx(got["gpu.all_reduce"]["values"]["algbw_gbps"])
    assert got["gpu.cudnn_conv"]["values"]["backend"]  # what torch's conv dispatch selected, by name
    assert got["gpu.tf32_off"]["values"]["off"] == {"matmul": payload.TF32_EXACT, "conv": payload.TF32_EXACT}
    placements = got["gpu.no_cpu_fallback"]["values"]["placements"]
    assert any(k.startswith("optimizer exp_avg") for k in placements) and not any("step" in k for k in placements)
    assert got["gpu.matmul"]["values"]["floor"] is None and got["gpu.matmul"]["values"]["n"] == 512
    assert inv["mixed_precision_dtype"] == "bfloat16"


def test_optimizer_state_is_read_after_training():
    mlp, _ = payload.torch_models(torch)
    x, y, _, _ = payload.torch_data(torch)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    before = payload.torch_placements(mlp, opt)
    assert not any(k.startswith("optimizer") for k in before)  # Adam makes its state at the first step
    payload.torch_train(torch, mlp, x, y, 2, torch.nn.MSELoss(), opt=opt)
    state = next(iter(opt.state.values()))
    state["exp_avg"] = state["exp_avg"].to("meta")  # state that ended up off the device
    report = payload.Report()
    payload.placement_verdict(report, "cpu", payload.torch_placements(mlp, opt))
    assert report.checks[0]["status"] == "fail" and "optimizer exp_avg[0] on meta" in report.checks[0]["detail"]


def test_all_reduce_is_bounded_when_a_rank_never_comes():
    report = payload.Report()
    t0 = time.monotonic()
    payload.torch_all_reduce(torch, report, 2, "gloo", timeout_s=3, start=1)
    assert time.monotonic() - t0 < 60
    got = report.checks[0]
    assert got["name"] == "gpu.all_reduce" and got["status"] == "fail", got
    assert got["detail"].startswith("gloo all-reduce over 2 ranks failed: rank 0:")


def test_compile_is_skipped_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    adapter = payload.TorchAdapter()
    adapter.load()
    report = payload.Report()
    adapter.compile_check(report, argparse.Namespace(gpu="auto"), {})
    got = report.checks[0]
    assert (got["name"], got["status"]) == ("compile.torch", "skip") and "no C/C++ compiler" in got["detail"]


def test_compile_failure_with_a_compiler_fails(monkeypatch):
    adapter = payload.TorchAdapter()
    adapter.load()
    monkeypatch.setattr(payload.shutil, "which", lambda name: f"/usr/bin/{name}")

    def broken(fn):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error")

    report = payload.Report()
    adapter.compile_check(report, argparse.Namespace(gpu="off"), {}, compile_fn=broken)
    got = report.checks[0]
    assert got["status"] == "fail" and "CppCompileError" in got["detail"]
    report = payload.Report()
    adapter.compile_check(report, argparse.Namespace(gpu="off"), {}, compile_fn=lambda fn: fn)
    assert report.checks[0]["status"] == "pass" and report.checks[0]["values"]["device"] == "cpu"
