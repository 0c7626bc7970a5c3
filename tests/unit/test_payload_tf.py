"""The payload's TensorFlow adapter, GPU path included (pointed at CPU devices), under Keras 2 and Keras 3.

TensorFlow cannot share the host venv with torch, so each version lives in a venv of its own, made once
and cached under ~/.cache/builder-test-venvs (BUILDER_TEST_VENVS overrides). Without them the tests skip
and say why; CI sets BUILDER_REQUIRE_TF_VENVS=1 so they fail instead. `python tests/unit/test_payload_tf.py`
makes the venvs ahead of the tests (.ci/run does this in the background).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("BUILDER_TEST_VENVS", Path.home() / ".cache" / "builder-test-venvs"))
PAYLOAD = Path(__file__).resolve().parents[2] / "builder" / "smoke" / "payload.py"
# Keras 2 is TF 2.15's tf.keras; TF 2.16 and later bring Keras 3, whose variables have no .device.
VENVS = {"keras2": ("tf215", "tensorflow-cpu==2.15.1"), "keras3": ("tf218", "tensorflow-cpu==2.18.1")}

# Runs in the TF venv: the payload's main() with --gpu require (no GPU here), then its GPU checks pointed at
# CPU devices, two of them for the all-reduce. Prints one JSON line.
SCRIPT = r"""
import argparse, importlib.util, json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
spec = importlib.util.spec_from_file_location("payload", sys.argv[1])
payload = importlib.util.module_from_spec(spec)
spec.loader.exec_module(payload)
claims, out = sys.argv[2], sys.argv[3]
with open(claims, "w") as fh:
    json.dump({"framework": "tensorflow", "version": tf.__version__, "python": "%d.%d" % sys.version_info[:2],
               "cuda": None, "cudnn": None}, fh)
code = payload.main(["--claims", claims, "--out", out, "--steps", "80", "--gpu", "require"])
inv = json.load(open(out))["inventory"]
report = payload.Report()
payload.tf_gpu(payload.ADAPTERS["tensorflow"].fw, report, argparse.Namespace(steps=80), inv, device="/CPU:0",
               devices=["/CPU:0", "/CPU:1"])
print("RESULT " + json.dumps({"code": code, "main": json.load(open(out)), "gpu_path": report.checks}, default=str))
"""


def make_venv(name: str, requirement: str) -> tuple[Path | None, str]:
    """(python of the venv, "") once it holds `requirement`, else (None, why not)."""
    path = ROOT / name
    python = path / "bin" / "python"
    marker = path / "builder-ready"
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # CI makes them in the background while the tests may start
        if marker.is_file() and marker.read_text() == requirement and python.exists():
            return python, ""
        steps = [[sys.executable, "-m", "venv", "--clear", str(path)],
                 [str(python), "-m", "pip", "install", "-q", requirement]]
        for step in steps:
            try:
                proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"{' '.join(step[:4])}: {exc}"
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
                return None, f"{' '.join(step[:4])} {step[-1]} exited {proc.returncode}: {tail[0]}"
        marker.write_text(requirement)
        return python, ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both venvs' results, run in parallel (each is ~30 s of TensorFlow on the CPU)."""
    procs = {}
    missing = {}
    for keras, (name, requirement) in VENVS.items():
        python, why = make_venv(name, requirement)
        if python is None:
            missing[keras] = f"cannot make the {requirement} venv under {ROOT}: {why}"
            continue
        tmp = tmp_path_factory.mktemp(keras)
        script = tmp / "run.py"
        script.write_text(SCRIPT)
        procs[keras] = subprocess.Popen([str(python), str(script), str(PAYLOAD), str(tmp / "cell.json"),
                                         str(tmp / "result.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
    results = {}
    for keras, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        results[keras] = json.loads(lines[-1][7:]) if lines else {"error": stderr[-3000:]}
    return results, missing


@pytest.fixture(params=sorted(VENVS))
def run(request, runs):
    results, missing = runs
    if request.param in missing:
        if os.environ.get("BUILDER_REQUIRE_TF_VENVS") == "1":
            pytest.fail(missing[request.param])
        pytest.skip(missing[request.param])
    result = results[request.param]
    assert "error" not in result, result.get("error")
    return request.param, result


def checks(items):
    return {c["name"]: c for c in items}


def test_the_venvs_are_keras_2_and_keras_3(run):
    keras, result = run
    assert result["main"]["inventory"]["keras"].split(".")[0] == keras[-1]


def test_tf_trains_and_checks_claims_on_the_cpu(run):
    _, result = run
    got = checks(result["main"]["checks"])
    for name in ("claims.python", "claims.framework", "claims.cpu_only", "train.cpu.mlp", "train.cpu.conv",
                 "checkpoint"):
        assert got[name]["status"] == "pass", got[name]
    assert result["main"]["payload_version"].startswith("sha256:")


def test_tf_gpu_required_but_not_visible_fails_naming_a_cpu_only_build(run):
    _, result = run
    got = checks(result["main"]["checks"])["gpu.visible"]
    assert result["code"] == 1 and got["status"] == "fail"
    assert "CPU-only build of TensorFlow (is_cuda_build is False)" in got["values"]["causes"]


def test_tf_gpu_path_runs_on_the_cpu_device(run):
    """Keras 3 variables have no .device: the old path raised AttributeError here."""
    _, result = run
    got = checks(result["gpu_path"])
    for name in ("gpu.cudnn_conv", "gpu.matches_cpu", "gpu.tf32_off", "gpu.bf16_native", "gpu.train_mixed_precision",
                 "gpu.no_cpu_fallback", "gpu.matmul", "gpu.linalg", "gpu.device_assert", "gpu.all_reduce"):
        assert got[name]["status"] == "pass", got[name]
    for name in ("gpu.arch_supported", "gpu.cudnn_runtime_vs_compile", "gpu.h2d_bandwidth"):
        assert got[name]["status"] == "skip", got[name]
    placements = got["gpu.no_cpu_fallback"]["values"]["placements"]
    assert sum(k.startswith("optimizer ") for k in placements) >= 8  # Adam's two moments per variable
    assert set(placements.values()) == {"cpu"}
    assert got["gpu.tf32_off"]["values"]["off"] == {"matmul": 256.0625, "conv": 256.0625}
    assert got["gpu.all_reduce"]["detail"].startswith("tf-cpu all-reduce over 2 ranks gave [3.0, 3.0], expected 3.0")


def test_tf_cudnn_is_measured_as_a_library(run):
    _, result = run
    library = result["main"]["inventory"]["cudnn_library"]
    assert library["version"] is None and library["searched"]  # tensorflow-cpu ships no libcudnn
    assert any(p.endswith("nvidia/cudnn/lib") for p in library["searched"])


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(VENVS)) as pool:  # two downloads at once: about 4 min cold instead of 6.5
        made = dict(zip(VENVS.values(), pool.map(lambda v: make_venv(*v), VENVS.values()), strict=True))
    for (_, requirement), (python, reason) in made.items():
        print(f"{requirement}: {python or 'FAILED: ' + reason}")
    sys.exit(0 if all(python for python, _ in made.values()) else 1)
