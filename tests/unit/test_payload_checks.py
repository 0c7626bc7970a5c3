"""The payload's verdicts, driver probe, cuDNN probe and dispatch, with no framework needed: each GPU failure
mode is fed in through fakes (a fake nvidia-smi, a fake libcudnn, fake adapters) and must give the level it
should."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.smoke import payload


def checks(report: payload.Report) -> dict[str, dict]:
    return {c["name"]: c for c in report.checks}


def one(report: payload.Report) -> dict:
    assert len(report.checks) == 1, report.checks
    return report.checks[0]


# ------------------------------------------------------------------------------------------ driver probe
def fake_nvidia_smi(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.fixture
def no_proc_driver(tmp_path, monkeypatch):
    monkeypatch.setattr(payload, "PROC_DRIVER", str(tmp_path / "no-proc-driver"))


def test_failing_nvidia_smi_is_no_driver_and_says_why(tmp_path, monkeypatch, no_proc_driver):
    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, f"echo \"{msg}\"\nexit 9\n")))
    assert payload.driver_probe()["version"] is None
    probe = payload.driver_probe()
    assert probe["version"] is None and probe["gpu_count"] is None
    assert probe["nvidia_smi"] == {"exit_code": 9, "output": msg}
    assert probe["reason"].startswith(f"nvidia-smi exited with 9: {msg}")


def test_nvidia_smi_exiting_0_without_a_version_is_no_driver(tmp_path, monkeypatch, no_proc_driver):
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, "echo 'No devices were found'\n")))
    assert payload.driver_probe()["version"] is None
    assert "printed no driver version: 'No devices were found'" in payload.driver_probe()["reason"]


def test_nvidia_smi_lists_gpus_and_driver(tmp_path, monkeypatch, no_proc_driver):
    lines = "NVIDIA H200, 550.54.15\\nNVIDIA H200, 550.54.15"
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, f"printf '{lines}\\n'\n")))
    probe = payload.driver_probe()
    assert payload.driver_probe()["version"] == "550.54.15"
    assert probe["gpus"] == ["NVIDIA H200", "NVIDIA H200"] and probe["gpu_count"] == 2 and probe["reason"] is None


def test_kernel_module_version_is_the_fallback(tmp_path, monkeypatch):
    proc = tmp_path / "nvidia"
    (proc / "gpus" / "0000:19:00.0").mkdir(parents=True)
    (proc / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release "
                                  "Build  (dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:17:59 UTC 2024\n")
    monkeypatch.setattr(payload, "PROC_DRIVER", str(proc))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    probe = payload.driver_probe()
    assert probe["version"] == "550.54.15" and probe["gpu_count"] == 1
    assert probe["proc_version"].startswith("NVRM version")


def test_no_gpu_causes_name_driver_and_hiding_variables(monkeypatch):
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe = {"nvidia_smi": {"exit_code": 9, "output": "NVIDIA-SMI has failed because ...\nmore"}, "proc_version": None}
    causes = payload.no_gpu_causes(probe, ["CPU-only build of torch (torch.version.cuda is None)"])
    assert causes == ["driver probe: nvidia-smi exited with 9 (NVIDIA-SMI has failed because ...)",
                      f"{payload.PROC_DRIVER}/version: absent (no NVIDIA kernel module visible)",
                      "NVIDIA_VISIBLE_DEVICES='void'", "CUDA_VISIBLE_DEVICES unset",
                      "CPU-only build of torch (torch.version.cuda is None)"]


# --------------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(("seen", "driver", "expected", "usable", "ok"), [
    (2, 2, 2, [True, True], True),
    (1, None, 2, [True], False),      # asked for two, got one
    (1, 2, None, [True], False),      # the driver lists more than the framework sees
    (2, None, None, [True, False], False),  # one device fails a round trip
    (0, 0, None, [], False),
])
def test_gpu_visible_compares_counts(seen, driver, expected, usable, ok):
    report = payload.Report()
    payload.visible_verdict(report, seen, driver, expected, [{"name": "NVIDIA H200"}] * seen, usable)
    assert (one(report)["status"] == "pass") is ok, one(report)


@pytest.mark.parametrize(("model", "tflops", "status", "floor"), [
    ("NVIDIA H200", 790.0, "pass", 494.5),
    ("NVIDIA H200", 300.0, "fail", 494.5),
    ("NVIDIA H100 80GB HBM3", 500.0, "pass", 494.5),
    ("NVIDIA H100 PCIe", 370.0, "fail", 378.0),
    ("NVIDIA A100-SXM4-80GB", 200.0, "pass", 156.0),
    ("NVIDIA A10", 60.0, "fail", 62.5),
    ("NVIDIA L40S", 200.0, "pass", 181.0),
    ("NVIDIA L40", 100.0, "pass", 90.5),
    ("NVIDIA L4", 50.0, "fail", 60.5),
    ("Tesla T4", 30.0, "fail", 32.5),
    ("Tesla V100-SXM2-16GB", 70.0, "pass", 62.5),
    ("Tesla V100-PCIE-32GB", 50.0, "fail", 56.0),
])
def test_matmul_floor_is_half_the_published_peak(model, tflops, status, floor):
    report = payload.Report()
    payload.matmul_verdict(report, tflops, model, "bfloat16", 8192)
    got = one(report)
    assert got["status"] == status and got["values"]["floor"] == pytest.approx(floor), got
    assert got["values"]["source"].startswith("https://")


@pytest.mark.parametrize("model", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "cpu"])
def test_unknown_model_is_measured_with_no_floor(model):
    report = payload.Report()
    payload.matmul_verdict(report, 10.0, model, "bfloat16", 4096)
    got = one(report)
    assert got["status"] == "pass" and got["values"]["floor"] is None and "no floor" in got["detail"]


def test_matmul_fails_when_the_peak_table_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(payload, "PEAKS_FILE", str(tmp_path / "gone.json"))
    monkeypatch.setattr(payload, "load_peaks", lambda path=str(tmp_path / "gone.json"): json.loads(Path(path).read_text()))
    report = payload.Report()
    payload.matmul_verdict(report, 800.0, "NVIDIA H200", "bfloat16", 8192)
    assert one(report)["status"] == "fail" and "peak table cannot be read" in one(report)["detail"]


def test_peak_table_is_sourced_data():
    table = payload.load_peaks()
    assert table["floor_fraction"] == 0.5
    for entry in table["models"]:
        assert entry["source"].startswith("https://") and "nvidia" in entry["source"], entry
        assert entry["dense_tflops"] > 0 and entry["dtype"] in ("bfloat16", "float16"), entry


def test_tf32_left_on_fails_and_both_results_are_recorded():
    def stuck_on(tf32):  # flags ignored: inputs rounded to TF32 either way
        return {"matmul": 256.0, "conv": 256.0}

    report = payload.Report()
    payload.tf32_verdict(report, stuck_on)
    assert one(report)["status"] == "fail" and "TF32 is still on" in one(report)["detail"]

    def obeys(tf32):
        return {"matmul": 256.0 if tf32 else payload.TF32_EXACT, "conv": payload.TF32_EXACT}

    report = payload.Report()
    payload.tf32_verdict(report, obeys)
    got = one(report)
    assert got["status"] == "pass" and got["values"]["on"]["matmul"] == 256.0
    assert got["values"]["tf32_effect"] == {"matmul": 0.0625}


def test_tf32_case_is_exact_in_float32_and_not_in_tf32():
    # 1 + 2**-12 needs 13 mantissa bits: float32 keeps it, TF32's 10 drop it.
    as_f32 = ctypes.c_float(payload.TF32_VALUE).value
    assert as_f32 == payload.TF32_VALUE and ctypes.c_float(payload.TF32_EXACT).value == payload.TF32_EXACT
    assert round(payload.TF32_VALUE * 2**10) / 2**10 == 1.0


def test_optimizer_state_off_the_device_fails():
    report = payload.Report()
    payload.placement_verdict(report, "cuda", {"param 0.weight": "cuda", "optimizer exp_avg[0]": "cpu"})
    got = one(report)
    assert got["status"] == "fail" and "optimizer exp_avg[0] on cpu" in got["detail"]
    report = payload.Report()
    payload.placement_verdict(report, "cuda", {"param 0.weight": "cuda"})
    assert one(report)["status"] == "fail" and "0 optimizer state" in one(report)["detail"]


@pytest.mark.parametrize(("cap", "dtype", "status", "native"), [
    ("9.0", "bfloat16", "pass", True), ("7.5", "float16", "pass", False), ("7.5", "bfloat16", "fail", False)])
def test_bf16_native_only_from_compute_capability_8(cap, dtype, status, native):
    report = payload.Report()
    payload.bf16_verdict(report, "cuda", cap, dtype)
    assert one(report)["status"] == status and one(report)["values"]["native"] is native
    assert payload.mixed_dtype("cuda", cap) == ("bfloat16" if native else "float16")


@pytest.mark.parametrize(("cap", "archs", "ok"), [
    ("9.0", ["sm_80", "sm_90"], True),
    ("8.9", ["sm_80", "sm_86"], True),            # same major, older minor: binary compatible
    ("9.0", ["sm_80", "compute_80"], True),       # PTX JIT
    ("9.0", ["sm_70", "sm_75"], False),
    ("10.0", ["sm_90a"], False),                  # arch-specific SASS runs only on its own arch
    ("8.0", ["sm_86"], False),                    # newer minor SASS does not run on an older one
])
def test_gpu_arch_must_be_in_the_wheel(cap, archs, ok):
    report = payload.Report()
    payload.arch_verdict(report, cap, archs)
    assert (one(report)["status"] == "pass") is ok, one(report)


@pytest.mark.parametrize(("runtime", "compiled", "ok"), [
    ("9.1.0", "9.1.0", True), ("9.3.0", "9", True), ("8.9.2", "9.1.0", False), ("9.0.0", "9.1.0", False),
    (None, "9.1.0", False)])
def test_cudnn_runtime_against_compile_version(runtime, compiled, ok):
    report = payload.Report()
    payload.cudnn_compat_verdict(report, runtime, compiled, "test")
    assert (one(report)["status"] == "pass") is ok


def test_h2d_bandwidth_floor():
    report = payload.Report()
    payload.bandwidth_verdict(report, 3.1, nbytes=2**28)
    payload.bandwidth_verdict(report, 25.0, nbytes=2**28)
    assert [c["status"] for c in report.checks] == ["fail", "pass"]


def test_linalg_over_tolerance_fails():
    report = payload.Report()
    payload.linalg_verdict(report, {"float32": {"solve": 1e-6}, "float64": {"solve": 1e-6}})
    assert one(report)["status"] == "fail" and "float64 solve" in one(report)["detail"]


def test_device_assert_must_be_reported():
    report = payload.Report()
    payload.device_assert_verdict(report, "cuda", 0, "0.0\n")
    payload.device_assert_verdict(report, "cuda", 1, "RuntimeError: CUDA error: device-side assert triggered\n")
    assert [c["status"] for c in report.checks] == ["fail", "pass"]


def test_all_reduce_bus_bandwidth_like_nccl_tests():
    report = payload.Report()
    results = [{"rank": r, "value": 10.0, "seconds": 0.01} for r in range(4)]
    payload.all_reduce_verdict(report, "nccl", 4, results, 2**28, 4)
    got = one(report)["values"]
    assert got["algbw_gbps"] == pytest.approx(2**28 / 0.01 / 1e9, rel=1e-3)
    assert got["busbw_gbps"] == pytest.approx(got["algbw_gbps"] * 2 * 3 / 4, rel=1e-3)
    assert got["unverified"] is True and one(report)["status"] == "pass"


@pytest.mark.parametrize("results", [
    [{"rank": 0, "value": 3.0, "seconds": 0.1}, {"rank": 1, "value": 2.0, "seconds": 0.1}],  # wrong sum
    [{"rank": 0, "value": 3.0, "seconds": 0.1}],                                              # a rank missing
    [{"rank": 0, "error": "rank 0: DistStoreError: timed out"}]])
def test_all_reduce_failures(results):
    report = payload.Report()
    payload.all_reduce_verdict(report, "gloo", 2, results, 2**20, 2)
    assert one(report)["status"] == "fail"


@pytest.mark.parametrize(("device", "backend", "kernels", "ok"), [
    ("cuda", "Cudnn", [], True), ("cuda", "Slow2d", ["implicit_convolve_sgemm"], False),
    ("cuda", None, ["cudnn::maxwell::gemm"], True), ("cuda", None, [], False), ("cpu", "Mkldnn", [], True)])
def test_torch_conv_backend_must_be_cudnn_on_cuda(device, backend, kernels, ok):
    report = payload.Report()
    payload.conv_backend_verdict(report, device, backend, kernels, "9.1.0")
    assert (one(report)["status"] == "pass") is ok


def test_tf_conv_on_gpu_needs_libcudnn_mapped():
    gpu = "/job:localhost/replica:0/task:0/device:GPU:0"
    report = payload.Report()
    payload.tf_cudnn_verdict(report, "gpu", gpu, [], None)
    payload.tf_cudnn_verdict(report, "gpu", "/job:localhost/replica:0/task:0/device:CPU:0", ["/x/libcudnn.so.9"], 90300)
    payload.tf_cudnn_verdict(report, "gpu", gpu, ["/x/libcudnn.so.9"], 90300)
    assert [c["status"] for c in report.checks] == ["fail", "fail", "pass"]
    assert "libcudnn.so.9 9.3.0 mapped" in report.checks[2]["detail"]


# ------------------------------------------------------------------------------------------- cuDNN probe
@pytest.fixture(scope="module")
def fake_cudnn(tmp_path_factory) -> Path:
    """A libcudnn.so.9 whose cudnnGetVersion() says 90300, as TF 2.18's does."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the fake libcudnn")
    lib = tmp_path_factory.mktemp("cudnn") / "lib"
    lib.mkdir()
    src = lib.parent / "fake.c"
    src.write_text("#include <stddef.h>\nsize_t cudnnGetVersion(void) { return 90300; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib / "libcudnn.so.9"), str(src)], check=True)
    return lib


def test_cudnn_measured_as_a_library_from_ld_library_path(fake_cudnn, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{fake_cudnn}")
    probe = payload.cudnn_probe()  # in a fresh interpreter, as in the image
    assert probe["version"] == 90300 and probe["path"] == str(fake_cudnn / "libcudnn.so.9")
    assert payload.decode_cudnn(probe["version"]) == "9.3.0"


def test_cudnn_probe_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    probe = payload.cudnn_probe()
    assert probe["version"] is None and str(tmp_path) in probe["searched"]
    assert any(p.endswith(os.path.join("nvidia", "cudnn", "lib")) for p in probe["searched"])


def test_a_cell_lying_about_its_cudnn_fails_against_the_library(fake_cudnn, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fake_cudnn))
    probe = payload.cudnn_probe()
    inv = {"framework_version": "2.18.0", "cuda": "12.5.1", "cudnn": payload.decode_cudnn(probe["version"]),
           "cudnn_source": f"cudnnGetVersion() of {probe['path']}", "cudnn_wheel": None}
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    report = payload.Report()
    payload.check_claims(report, {"version": "2.18.0", "python": py, "cuda": "12.5", "cudnn": "9.1.0.70"}, inv,
                         "tensorflow")
    got = checks(report)["claims.cudnn"]
    assert got["status"] == "fail" and got["detail"].startswith("claims cuDNN 9.1, tensorflow loads 9.3.0 (cudnnGetVersion")
    report = payload.Report()
    payload.check_claims(report, {"version": "2.18.0", "python": py, "cuda": "12.5", "cudnn": "9.3.0.75"}, inv,
                         "tensorflow")
    assert checks(report)["claims.cudnn"]["status"] == "pass"


def test_mapped_cudnn_is_read_from_proc_self_maps(fake_cudnn):
    ctypes.CDLL(str(fake_cudnn / "libcudnn.so.9"))  # what a conv on a GPU makes TF do
    version, paths = payload.cudnn_mapped_version()
    assert version == 90300 and str(fake_cudnn / "libcudnn.so.9") in paths


# --------------------------------------------------------------------------------------- dispatch, CLI
class FakeAdapter(payload.Adapter):
    """A framework with `seen` devices, to drive run()'s GPU decisions without one."""

    name = "fake"

    def __init__(self, seen, usable=True):
        self.seen, self.usable, self.ran = seen, usable, []

    def load(self):
        return None

    def inventory(self):
        return {"framework_version": "1.0", "cuda": "12.4", "gpus": [{"name": "NVIDIA H200"}] * self.seen}

    def gpu_count(self):
        return self.seen

    def no_gpu_reasons(self, inv):
        return ["fake: driver/runtime mismatch"]

    def device_usable(self, index):
        return self.usable

    def train_cpu(self, report, args, inv):
        self.ran.append("train")

    def gpu_checks(self, report, args, inv):
        self.ran.append("gpu")


def run_fake(adapter, probe, *argv):
    args = payload.parser().parse_args(["--framework", "torch", *argv])
    report = payload.Report()
    inv: dict = {}
    payload.run(adapter, report, None, args, inv, probe)
    return checks(report), inv


PROBE = {"version": None, "gpu_count": None, "nvidia_smi": None, "proc_version": None}


def test_require_without_a_gpu_fails_naming_the_cause():
    got, inv = run_fake(FakeAdapter(0), PROBE, "--gpu", "require")
    assert got["gpu.visible"]["status"] == "fail" and inv["no_gpu_causes"] == got["gpu.visible"]["values"]["causes"]
    assert got["gpu.visible"]["detail"].startswith("GPUs were requested but fake sees none: driver probe: no nvidia-smi")
    assert "fake: driver/runtime mismatch" in got["gpu.visible"]["values"]["causes"]


def test_auto_without_a_gpu_skips_with_the_cause():
    got, _ = run_fake(FakeAdapter(0), PROBE)
    assert got["gpu"]["status"] == "skip" and "fake: driver/runtime mismatch" in got["gpu"]["detail"]
    assert not any(name.startswith("gpu.") for name in got)


def test_fewer_gpus_than_the_driver_lists_fails_visible_but_runs_the_checks():
    adapter = FakeAdapter(1)
    got, _ = run_fake(adapter, {**PROBE, "gpu_count": 2})
    assert got["gpu.visible"]["status"] == "fail" and "the driver lists 2" in got["gpu.visible"]["detail"]
    assert adapter.ran == ["train", "gpu"]


def test_expected_count_is_compared():
    got, _ = run_fake(FakeAdapter(2), PROBE, "--expect-gpus", "2")
    assert got["gpu.visible"]["status"] == "pass"
    got, _ = run_fake(FakeAdapter(1), PROBE, "--expect-gpus", "2")
    assert got["gpu.visible"]["status"] == "fail"


def test_gpu_off_runs_no_gpu_check():
    adapter = FakeAdapter(2)
    got, _ = run_fake(adapter, PROBE, "--gpu", "off")
    assert got["gpu"]["status"] == "skip" and adapter.ran == ["train"]


def test_every_framework_is_one_adapter():
    assert set(payload.ADAPTERS) == {"torch", "tensorflow"}
    for name, adapter in payload.ADAPTERS.items():
        assert isinstance(adapter, payload.Adapter) and adapter.name == name and adapter.module
    assert payload.parser().parse_args(["--framework", "tensorflow", "--gpu", "require"]).gpu == "require"


def test_tensorflow_memory_growth_is_set_on_every_gpu_before_use(monkeypatch):
    calls: list[tuple] = []

    class Experimental:
        @staticmethod
        def set_memory_growth(device, on):
            calls.append(("growth", device, on))

    class Config:
        experimental = Experimental

        @staticmethod
        def list_physical_devices(kind):
            calls.append(("list", kind))
            return ["GPU:0", "GPU:1"]

    fake_tf = argparse.Namespace(config=Config)
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    adapter = payload.TensorFlowAdapter()
    assert adapter.load() is fake_tf and adapter.gpu_count() == 2
    assert calls == [("list", "GPU"), ("growth", "GPU:0", True), ("growth", "GPU:1", True)]


def test_tensorflow_skipping_gpus_is_named_from_its_native_log(monkeypatch):
    """A CUDA build of TF that cannot load its GPU libraries says so only in C++ logging, on fd 2."""
    line = ("W0000 00:00:1700000000.000000 1 gpu_device.cc:2344] Cannot dlopen some GPU libraries. ... "
            "Skipping registering GPU devices...")

    class Config:
        @staticmethod
        def list_physical_devices(kind):
            os.write(2, (line + "\n").encode())
            return []

    class Sysconfig:
        @staticmethod
        def get_build_info():
            return {"is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9"}

    monkeypatch.setitem(sys.modules, "tensorflow", argparse.Namespace(config=Config, sysconfig=Sysconfig))
    adapter = payload.TensorFlowAdapter()
    adapter.load()
    assert adapter.gpu_count() == 0
    assert adapter.no_gpu_reasons({}) == [f"TensorFlow: {line}"]


def test_payload_version_covers_every_payload_file(tmp_path):
    copy = tmp_path / "smoke"
    shutil.copytree(Path(payload.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = payload.payload_version(str(copy))
    assert before == payload.payload_version() and before.startswith("sha256:")
    peaks = copy / "gpu_peaks.json"
    peaks.write_text(peaks.read_text().replace("989", "98"))
    assert payload.payload_version(str(copy)) != before


def test_payload_stands_alone():
    source = Path(payload.__file__).read_text()
    assert "import builder" not in source and "from builder" not in source
