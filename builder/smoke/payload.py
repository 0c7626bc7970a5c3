"""The smoke payload: inventory, claims check, training, and the GPU path, one adapter per framework.

It runs inside the image under test (put there at certify time with every file beside it) and on any
host with a framework installed: standard library plus the framework only, and it never imports
builder. The result is JSON written to --out (not mixed into the logs); the exit status is 0 when every
check that ran passed.

    python payload.py --claims cell.json --out result.json [--gpu auto|off|require] [--expect-gpus N]
                      [--steps N] [--compile auto|off] [--all-reduce-timeout S] [--promises]

Checks (status pass, fail or skip; each verdict is a function its tests feed failures to):
  claims.*            Python, framework, CUDA and cuDNN as measured (TF: cudnnGetVersion of the libcudnn
                      on the image's library path) against what the cell claims
  train.cpu.*, checkpoint, pip_check, compile.torch (skip, with the reason, when there is no compiler; in a
                      devel image, per the claims' flavor, no compiler fails)
  model.NAME          each pretrained model the cell bakes in: loaded through the hub's own API with the network
                      off (torch.hub.load_state_dict_from_url / tensorflow_hub.load must find it in the image's
                      cache), one forward pass on a fixed input (finite, batch kept); name, sha256 and load time
  devel.*             devel images: cuda_version (nvcc's release equals torch.version.cuda), nvcc (a kernel to
                      cubin + PTX for sm_90 and a fatbin for every arch torch lists), cpp_extension (built
                      with TORCH_CUDA_ARCH_LIST set, imported, and with a GPU run against a reference)
  gpu.visible         the framework's GPU count equals the driver's (nvidia-smi) and --expect-gpus, and
                      every device takes a round trip; with --gpu require and no GPU it fails naming why
  gpu.arch_supported  the GPU's compute capability has SASS or PTX in the framework's arch list
  gpu.cudnn_runtime_vs_compile, gpu.cudnn_conv (the conv backend torch selects; the libcudnn TF maps)
  gpu.matches_cpu, gpu.tf32_off (a case TF32 changes, run with TF32 on and off), gpu.bf16_native
  gpu.train_mixed_precision, gpu.no_cpu_fallback (parameters and optimizer state, after training)
  gpu.matmul          at least half the model's published dense peak (gpu_peaks.json); unknown: no floor
  gpu.linalg, gpu.h2d_bandwidth, gpu.device_assert, gpu.all_reduce (busbw as nccl-tests; NCCL unverified)
"""

import argparse
import ctypes
import datetime
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import platform
import queue as queue_module
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager

SCHEMA = 2
HERE = os.path.dirname(os.path.abspath(__file__))
PEAKS_FILE = os.path.join(HERE, "gpu_peaks.json")
PROC_DRIVER = "/proc/driver/nvidia"
VERSION = re.compile(r"\d+\.\d+(?:\.\d+)*")
# The loss must fall below this fraction of its first value for training to count as learning.
LOSS_FRACTION = {"mlp": 0.5, "conv": 0.8}
# GPU and CPU results of the same float32 computation must agree to within this (TF32 is switched off).
GPU_CPU_TOLERANCE = 1e-3
# Relative error allowed for the linear-algebra checks (solve residual, Cholesky and matmul against the CPU).
LINALG_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
# Pinned host-to-device copies: half of what a PCIe 3.0 x16 link delivers (~12 GB/s). A GPU behind a
# narrower or slower link, or a copy that is not really pinned, falls under it.
H2D_FLOOR_GBPS = 6.0
# TF32 keeps 10 mantissa bits: 1 + 2**-12 rounds to 1.0, so a sum of K such products loses K * 2**-12.
TF32_K = 256
TF32_VALUE = 1 + 2**-12
TF32_EXACT = TF32_K * TF32_VALUE  # 256.0625, exact in float32
ALL_REDUCE_TIMEOUT = 120.0
COMPILERS = ("c++", "g++", "clang++", "cc", "gcc")
# How many of a failed build's last lines a check keeps (the cause; the first line is often the command).
ERROR_TAIL_LINES = 20
CUDNN_NAMES = ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so")
# Every gpu.* name this payload can emit; certify's decide() picks its required set from these.
GPU_CHECKS = ("gpu.visible", "gpu.arch_supported", "gpu.cudnn_runtime_vs_compile", "gpu.cudnn_conv",
              "gpu.matches_cpu", "gpu.tf32_off", "gpu.bf16_native", "gpu.train_mixed_precision",
              "gpu.no_cpu_fallback", "gpu.matmul", "gpu.linalg", "gpu.h2d_bandwidth", "gpu.device_assert",
              "gpu.all_reduce")


class Report:
    def __init__(self):
        self.checks = []

    def add(self, name, ok, detail="", **values):
        status = "pass" if ok else "fail"
        self.checks.append({"name": name, "status": status, "detail": detail, "values": values})
        print(f"[{status}] {name}: {detail}", file=sys.stderr)
        return ok

    def skip(self, name, detail, **values):
        self.checks.append({"name": name, "status": "skip", "detail": detail, "values": values})
        print(f"[skip] {name}: {detail}", file=sys.stderr)

    def guard(self, name, fn):
        """Run one check; an exception fails that check, not the whole payload. A multi-line error (a compiler's
        or ninja's output) keeps its last lines, where the cause is: its first line is often only the command."""
        try:
            return fn()
        except Exception as exc:  # a broken framework must be reported, not crash the run
            lines = error_tail(exc)
            detail = f"{type(exc).__name__}: {first_line(exc)[:300]}"
            if len(lines) > 1:
                self.add(name, False, f"{detail} ... {lines[-1][:300]}", error_tail=lines)
            else:
                self.add(name, False, detail)
            return None


def first_line(value):
    text = str(value).strip()
    return text.splitlines()[0] if text else ""


def error_tail(value, count=ERROR_TAIL_LINES):
    """The last `count` non-blank lines of an error's text (each cut to 500 characters)."""
    return [line.rstrip()[:500] for line in str(value).splitlines() if line.strip()][-count:]


def major_minor(version):
    return ".".join(str(version).split(".")[:2]) if version else None


def decode_cudnn(number):
    """cuDNN reports itself as one integer: 8xyz for cuDNN 8 (8902), MMmmpp for 9 and later (90100)."""
    if not number:
        return None
    number = int(number)
    if number < 10000:
        return f"{number // 1000}.{(number % 1000) // 100}.{number % 100}"
    return f"{number // 10000}.{(number % 10000) // 100}.{number % 100}"


def version_tuple(text):
    """(9, 3, 0) from "9.3.0"; (9,) from "9" (TF's build info gives cuDNN's major only); () from nothing."""
    found = re.match(r"\d+(?:\.\d+)*", str(text)) if text else None
    return tuple(int(p) for p in found.group(0).split(".")) if found else ()


def payload_version(directory=HERE):
    """sha256 over the payload's files (name and content, sorted): what certify records as the checker."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name.endswith((".py", ".json")):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as fh:
                digest.update(fh.read() + b"\0")
    return "sha256:" + digest.hexdigest()


def nvidia_wheels():
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("nvidia-", "cuda-")):
            found[name] = dist.version
    return dict(sorted(found.items()))


def cudnn_wheel(wheels):
    for name, version in wheels.items():
        if name.startswith("nvidia-cudnn"):
            return name, version
    return None, None


def pip_check():
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-2000:]


# ------------------------------------------------------------------------------------------ the driver
def driver_probe():
    """What the NVIDIA driver says on this machine: version, GPU names, and why not when it says nothing.

    nvidia-smi counts only when it exits 0 and prints a version; "NVIDIA-SMI has failed ..." is a
    reason, not a driver. /proc/driver/nvidia/version (the kernel module) is the fallback.
    """
    probe = {"version": None, "gpus": [], "gpu_count": None, "reason": None, "nvidia_smi": None,
             "proc_version": None}
    problems = []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        problems.append("no nvidia-smi on PATH")
    else:
        try:
            proc = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
            output = (proc.stdout + proc.stderr).strip()
            probe["nvidia_smi"] = {"exit_code": proc.returncode, "output": output[-1000:]}
            if proc.returncode != 0:
                problems.append(f"nvidia-smi exited with {proc.returncode}: {first_line(output) or 'no output'}")
            else:
                for line in proc.stdout.splitlines():
                    name, _, version = line.rpartition(",")
                    if name.strip() and VERSION.fullmatch(version.strip()):
                        probe["gpus"].append(name.strip())
                        probe["version"] = probe["version"] or version.strip()
                probe["gpu_count"] = len(probe["gpus"])
                if probe["version"] is None:
                    problems.append(f"nvidia-smi printed no driver version: {first_line(output) or 'no output'!r}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"nvidia-smi did not run: {exc}")
    try:
        with open(os.path.join(PROC_DRIVER, "version")) as fh:
            text = fh.read()
        probe["proc_version"] = first_line(text)
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)*)\s", text + " ")
        if probe["version"] is None and found:
            probe["version"] = found.group(1)
    except OSError:
        problems.append(f"no {PROC_DRIVER}/version (no NVIDIA kernel module visible)")
    if probe["gpu_count"] is None and os.path.isdir(os.path.join(PROC_DRIVER, "gpus")):
        probe["gpu_count"] = len(os.listdir(os.path.join(PROC_DRIVER, "gpus")))
    if probe["version"] is None:
        probe["reason"] = "; ".join(problems)
    return probe


def hidden_by_environment():
    """The environment variables that decide which GPUs a process may see, as they are set."""
    return {var: os.environ.get(var) for var in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}


def no_gpu_causes(probe, framework_causes):
    """Why no GPU is visible, in the order a person would check: driver, container settings, framework."""
    smi = probe.get("nvidia_smi")
    if smi is None:
        causes = ["driver probe: no nvidia-smi on PATH"]
    else:
        causes = [f"driver probe: nvidia-smi exited with {smi['exit_code']}"
                  + (f" ({first_line(smi['output'])})" if smi["output"] else "")]
    causes.append(f"{PROC_DRIVER}/version: " + (probe.get("proc_version")
                                                or "absent (no NVIDIA kernel module visible)"))
    for var, value in hidden_by_environment().items():
        causes.append(f"{var} unset" if value is None else f"{var}={value!r}")
    return causes + list(framework_causes)


def visible_verdict(report, seen, driver_count, expected, gpus, usable):
    """gpu.visible: the framework's device count against the driver's and the count asked for."""
    problems = []
    if seen < 1:
        problems.append("the framework sees no GPU")
    if expected is not None and seen != expected:
        problems.append(f"{expected} GPU(s) were asked for")
    if driver_count is not None and seen != driver_count:
        problems.append(f"the driver lists {driver_count}")
    broken = [i for i, ok in enumerate(usable) if not ok]
    if broken:
        problems.append(f"device(s) {broken} failed a round trip")
    compared = [w for w, v in (("the request", expected), ("the driver", driver_count)) if v is not None]
    names = ", ".join(sorted({g.get("name") or "?" for g in gpus})) or "unnamed"
    detail = f"framework sees {seen} GPU(s) ({names})"
    if problems:
        detail += ", but " + "; ".join(problems)
    else:
        detail += "; matches " + (" and ".join(compared) if compared else "nothing independent (no driver "
                                   "count, no --expect-gpus)") + "; each device took a round trip"
    return report.add("gpu.visible", not problems, detail, seen=seen, driver_count=driver_count,
                      expected=expected, gpus=gpus, usable=usable)


# ------------------------------------------------------------------------------------------- cuDNN
def cudnn_search_dirs():
    """Where the image points a framework for libcudnn: LD_LIBRARY_PATH, then the nvidia-cudnn wheel's lib."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    roots = list(site.getsitepackages()) + [p for p in sys.path if p.endswith("site-packages")]
    dirs += [os.path.join(root, "nvidia", "cudnn", "lib") for root in roots]
    return list(dict.fromkeys(dirs))


def _cudnn_version_of(path):
    lib = ctypes.CDLL(path)
    fn = lib.cudnnGetVersion
    fn.restype = ctypes.c_size_t
    return int(fn())


def mapped_libraries(pattern, maps="/proc/self/maps"):
    """Paths of the shared objects mapped into this process whose file name matches `pattern`."""
    found = set()
    with open(maps) as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) == 6 and re.search(pattern, os.path.basename(parts[5].strip())):
                found.add(parts[5].strip())
    return sorted(found)


def cudnn_library(dirs=None):
    """Load libcudnn with ctypes and ask it its version: works without a GPU. Run in a fresh process
    (cudnn_probe) so that the library TF later maps is its own choice, not this probe's."""
    dirs = cudnn_search_dirs() if dirs is None else dirs
    errors = []
    for directory in dirs:
        for name in CUDNN_NAMES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                try:
                    return {"version": _cudnn_version_of(path), "path": os.path.realpath(path), "searched": dirs}
                except (OSError, AttributeError) as exc:
                    errors.append(f"{path}: {exc}")
    for name in CUDNN_NAMES:  # the dynamic linker's own search: ldconfig cache (cuDNN from apt packages)
        try:
            version = _cudnn_version_of(name)
        except (OSError, AttributeError):
            continue
        mapped = mapped_libraries(r"^libcudnn\.so")
        return {"version": version, "path": mapped[0] if mapped else name, "searched": dirs}
    return {"version": None, "path": None, "searched": dirs, "errors": errors}


def cudnn_probe():
    """cudnn_library() in a fresh interpreter: the measured cuDNN of an image, as a dict."""
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cudnn-probe"], capture_output=True,
                              text=True, timeout=60)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"version": None, "path": None, "errors": [f"probe failed: {exc}"]}


def cudnn_compat_verdict(report, runtime, compiled, source):
    """gpu.cudnn_runtime_vs_compile: same major, and the runtime at least as new as the build expects."""
    rt, ct = version_tuple(runtime), version_tuple(compiled)
    if not rt:
        return report.add("gpu.cudnn_runtime_vs_compile", False, f"no cuDNN loaded at run time (built against "
                          f"{compiled})", runtime=runtime, compiled=compiled, source=source)
    ok = bool(ct) and rt[0] == ct[0] and rt[:2] >= ct[:2]
    return report.add("gpu.cudnn_runtime_vs_compile", ok, f"runtime cuDNN {runtime} ({source}), built against "
                      f"{compiled}" + ("" if ok else ": the major differs or the runtime is older"),
                      runtime=runtime, compiled=compiled, source=source)


# ----------------------------------------------------------------------------------- shared verdicts
def arch_verdict(report, capability, arch_list):
    """gpu.arch_supported: the wheel carries SASS for this GPU (same major, minor not above) or PTX to JIT."""
    if not capability:
        report.skip("gpu.arch_supported", "no compute capability (CPU device)", arch_list=arch_list)
        return True
    major, minor = (int(p) for p in capability.split("."))
    sass, ptx = [], []
    for arch in arch_list or []:
        m = re.fullmatch(r"(sm|compute)_(\d+)([a-z]?)", arch)
        if not m:
            continue
        num = int(m.group(2))
        amaj, amin = num // 10, num % 10
        if m.group(1) == "sm" and amaj == major and amin <= minor and (not m.group(3) or amin == minor):
            sass.append(arch)
        elif m.group(1) == "compute" and not m.group(3) and (amaj, amin) <= (major, minor):
            ptx.append(arch)
    how = f"SASS {sass[-1]}" if sass else f"PTX {ptx[-1]} (JIT-compiled at first use)" if ptx else None
    return report.add("gpu.arch_supported", how is not None, f"compute capability {capability}: " + (
        how or f"not in the wheel's arch list {arch_list}"), capability=capability, arch_list=arch_list,
        sass=sass, ptx=ptx)


def bf16_verdict(report, device_type, capability, dtype):
    """gpu.bf16_native: bf16 runs on tensor cores only from compute capability 8.0; below it, it is emulated."""
    if device_type == "cpu":
        return report.add("gpu.bf16_native", True, f"CPU device: mixed precision runs in {dtype}, no tensor "
                          "cores", capability=None, native=None, dtype=dtype)
    native = bool(version_tuple(capability)) and version_tuple(capability) >= (8, 0)
    ok = native or dtype != "bfloat16"
    detail = (f"compute capability {capability}: bf16 is native" if native else
              f"compute capability {capability} has no native bf16: mixed precision uses {dtype}")
    if not ok:
        detail = f"compute capability {capability}: mixed precision would run in emulated bfloat16"
    return report.add("gpu.bf16_native", ok, detail, capability=capability, native=native, dtype=dtype)


def mixed_dtype(device_type, capability):
    """bf16 where it is native (and on the CPU device), fp16 on older GPUs."""
    if device_type == "cpu":
        return "bfloat16"
    return "bfloat16" if version_tuple(capability) >= (8, 0) else "float16"


def tf32_verdict(report, run):
    """gpu.tf32_off: `run(tf32)` returns {case: value} for products of 1 + 2**-12 summed TF32_K times.

    With TF32 off every case must be exact; with it on, a GPU with TF32 shows K * 2**-12 less. Both are
    recorded, and the flags are left off.
    """
    on = run(True)
    off = run(False)
    wrong = {k: v for k, v in off.items() if abs(v - TF32_EXACT) > 1e-6}
    effect = {k: round(off[k] - on[k], 6) for k in off if on.get(k) != off[k]}
    detail = f"with TF32 off: {off} (exact {TF32_EXACT})"
    if wrong:
        detail = f"TF32 is still on where it must be off: {wrong}, exact is {TF32_EXACT}"
    elif effect:
        detail += f"; with TF32 on the same cases lose {effect}: it would have hidden that much"
    else:
        detail += "; TF32 does not change these cases on this device"
    return report.add("gpu.tf32_off", not wrong, detail, off=off, on=on, exact=TF32_EXACT, tf32_effect=effect)


def placement_verdict(report, device_type, placements):
    """gpu.no_cpu_fallback: every parameter and every piece of optimizer state lives on the device."""
    params = {k: v for k, v in placements.items() if k.startswith("param ")}
    state = {k: v for k, v in placements.items() if k.startswith("optimizer ")}
    stray = {k: v for k, v in placements.items() if v != device_type}
    if not params or not state:
        return report.add("gpu.no_cpu_fallback", False, f"nothing to check after training: {len(params)} "
                          f"parameter(s), {len(state)} optimizer state tensor(s)", placements=placements)
    detail = (f"after training, {len(params)} parameters and {len(state)} optimizer state tensors live on "
              f"{device_type}")
    if stray:
        detail = f"after training, {len(stray)} of {len(placements)} tensors are not on {device_type}: " + \
            ", ".join(f"{k} on {v}" for k, v in list(stray.items())[:4])
    return report.add("gpu.no_cpu_fallback", not stray, detail, placements=placements)


def load_peaks(path=PEAKS_FILE):
    with open(path) as fh:
        return json.load(fh)


def matmul_verdict(report, tflops, model, dtype, n, peaks=None):
    """gpu.matmul: at least floor_fraction of the model's published dense peak; an unknown model has no floor."""
    try:
        table = peaks if peaks is not None else load_peaks()
    except (OSError, ValueError) as exc:
        return report.add("gpu.matmul", False, f"{n}^3 {dtype} matmul: {tflops:.1f} TFLOP/s, but the peak table "
                          f"cannot be read: {exc}", tflops=tflops, floor=None)
    entry = next((m for m in table["models"] if re.search(m["match"], model or "", re.IGNORECASE)), None)
    values = {"tflops": round(tflops, 3), "n": n, "dtype": dtype, "model": model}
    if entry is None:
        return report.add("gpu.matmul", tflops > 0, f"{n}^3 {dtype} matmul on {model}: {tflops:.1f} TFLOP/s; no "
                          "floor: this model is not in the peak table (measured only)", floor=None, peak=None,
                          source=None, **values)
    floor = table["floor_fraction"] * entry["dense_tflops"]
    ok = tflops >= floor
    return report.add("gpu.matmul", ok, f"{n}^3 {dtype} matmul on {model}: {tflops:.1f} TFLOP/s, "
                      f"{'at least' if ok else 'below'} the floor {floor:.1f} ({table['floor_fraction']:.0%} of "
                      f"{entry['model']}'s dense {entry['dtype']} peak {entry['dense_tflops']})", floor=floor,
                      peak=entry["dense_tflops"], peak_dtype=entry["dtype"], source=entry["source"], **values)


def bandwidth_verdict(report, gbps, floor=H2D_FLOOR_GBPS, nbytes=0):
    return report.add("gpu.h2d_bandwidth", gbps >= floor, f"pinned host-to-device copy of {nbytes / 2**20:.0f} "
                      f"MiB: {gbps:.1f} GB/s ({'at least' if gbps >= floor else 'below'} the floor {floor} GB/s)",
                      gbps=round(gbps, 2), floor=floor, bytes=nbytes)


def linalg_verdict(report, errors):
    """errors: {dtype: {case: relative error}}; each must be under LINALG_TOLERANCE[dtype]."""
    bad = {f"{d} {case}": e for d, cases in errors.items() for case, e in cases.items()
           if not e <= LINALG_TOLERANCE[d]}
    detail = ", ".join(f"{d}: " + " ".join(f"{c} {e:.1e}" for c, e in cases.items()) for d, cases in errors.items())
    if bad:
        detail = f"over tolerance {LINALG_TOLERANCE}: {bad}; " + detail
    return report.add("gpu.linalg", not bad, detail, errors=errors, tolerance=LINALG_TOLERANCE)


def device_assert_verdict(report, device_type, code, output):
    """gpu.device_assert: an out-of-range index on the device is caught and reported, not silently written."""
    marker = "device-side assert" if device_type == "cuda" else "out of bounds"
    ok = code not in (0, None) and marker in output
    tail = first_line(output.strip().splitlines()[-1]) if output.strip() else "no output"
    detail = (f"out-of-range index on {device_type} raised ({tail})" if ok else
              f"out-of-range index on {device_type} was not reported as '{marker}' (exit {code}: {tail})")
    return report.add("gpu.device_assert", ok, detail, exit_code=code, marker=marker)


def all_reduce_verdict(report, backend, world, results, nbytes, started, exit_codes=None):
    """gpu.all_reduce: every rank got the sum, and the bus bandwidth as nccl-tests reports it."""
    errors = [r["error"] for r in results if "error" in r]
    want = world * (world + 1) / 2
    values = sorted(r["value"] for r in results if "value" in r)
    if errors or len(values) != world:
        missing = world - len(values) - len(errors)
        why = "; ".join(errors[:2]) or f"{missing} of {world} ranks gave no result within the time limit"
        if exit_codes and not errors:
            why += f" (rank exit codes {exit_codes})"
        return report.add("gpu.all_reduce", False, f"{backend} all-reduce over {world} ranks failed: {why}",
                          backend=backend, world=world, started=started, exit_codes=exit_codes,
                          unverified=backend == "nccl")
    seconds = max(r["seconds"] for r in results)
    algbw = nbytes / seconds / 1e9
    busbw = algbw * 2 * (world - 1) / world
    ok = all(abs(v - want) < 1e-6 for v in values)
    detail = (f"{backend} all-reduce over {world} ranks gave {values}, expected {want}; {nbytes / 2**20:.0f} MiB: "
              f"algbw {algbw:.2f} GB/s, busbw {busbw:.2f} GB/s")
    if backend == "nccl":
        detail += " (NCCL path unverified until a host with two GPUs has run it)"
    return report.add("gpu.all_reduce", ok, detail, backend=backend, world=world, bytes=nbytes,
                      seconds=round(seconds, 6), algbw_gbps=round(algbw, 3), busbw_gbps=round(busbw, 3),
                      unverified=backend == "nccl")


def check_claims(report, claims, inv, framework):
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    report.add("claims.python", claims["python"] == py, f"claims Python {claims['python']}, runs {py}",
               claimed=claims["python"], measured=platform.python_version())
    measured_fw = (inv["framework_version"] or "").split("+")[0]
    report.add("claims.framework", claims["version"] == measured_fw,
               f"claims {framework} {claims['version']}, imports {inv['framework_version']}",
               claimed=claims["version"], measured=inv["framework_version"])
    if claims.get("cuda") is None:
        extra = "" if inv["cuda"] is None else f", but {framework} is built for CUDA {inv['cuda']}"
        report.add("claims.cpu_only", inv["cuda"] is None, "CPU-only cell" + extra, measured=inv["cuda"])
        return
    cuda = major_minor(inv["cuda"])
    report.add("claims.cuda", cuda == claims["cuda"], f"claims CUDA {claims['cuda']}, {framework} is built for "
               f"{inv['cuda'] or 'no CUDA'}", claimed=claims["cuda"], measured=inv["cuda"])
    want = major_minor(claims["cudnn"])
    got = inv["cudnn"]
    source = f" ({inv['cudnn_source']})" if got and inv.get("cudnn_source") else ""
    report.add("claims.cudnn", major_minor(got) == want,
               f"claims cuDNN {want}, {framework} loads {got or 'none'}{source}", claimed=claims["cudnn"],
               measured=got, source=inv.get("cudnn_source"))
    if inv["cudnn_wheel"]:
        report.add("claims.cudnn_wheel", inv["cudnn_wheel"] == claims["cudnn"],
                   f"claims cuDNN {claims['cudnn']}, wheel {inv['cudnn_wheel_name']} is {inv['cudnn_wheel']}",
                   claimed=claims["cudnn"], measured=inv["cudnn_wheel"])


def falls(report, name, losses, fraction):
    first, last = losses[0], losses[-1]
    return report.add(name, last < fraction * first,
                      f"loss {first:.4f} -> {last:.4f} (must fall below {fraction:.0%} of its start)",
                      first_loss=first, last_loss=last, steps=len(losses), fraction=fraction)


def matmul_size(device_type, memory_gb):
    if device_type == "cpu":
        return 512
    return 8192 if (memory_gb or 0) > 20 else 4096


@contextmanager
def native_stderr(lines):
    """Capture file descriptor 2 (where C++ logging goes) into `lines`, and pass it on to the real stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sys.stderr.write(text)
            lines.extend(text.splitlines())


# ------------------------------------------------------------------------------------------ adapters
class Adapter:
    """One framework: its packages, inventory, cuDNN probe, training and GPU checks. Subclasses fill it in."""

    name = ""
    module = ""
    distributions = ()

    def load(self):
        self.fw = importlib.import_module(self.module)
        return self.fw

    def inventory(self):
        raise NotImplementedError

    def gpu_count(self):
        raise NotImplementedError

    def no_gpu_reasons(self, inv):
        raise NotImplementedError

    def device_usable(self, index):
        raise NotImplementedError

    def train_cpu(self, report, args, inv):
        raise NotImplementedError

    def compile_check(self, report, args, inv):
        """A framework with no compiler to record has nothing to add."""

    def devel_checks(self, report, args, inv):
        """A devel image's toolchain, proved by use. A framework without such checks says so; its image fails."""
        report.add("devel", False, f"the payload has no toolchain checks for {self.name}; a devel image of it "
                   "cannot be certified")

    def gpu_checks(self, report, args, inv):
        raise NotImplementedError

    def load_model(self, model):
        """Load a baked model through the hub's API and run one forward pass: (where, load s, output shape, finite)."""
        raise NotImplementedError(f"the payload cannot load {model.get('hub')} models in a {self.name} image")

    def packages(self):
        found = {}
        for name in self.distributions:
            try:
                found[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return found


# ----------------------------------------------------------------------------------------------- torch
def torch_models(torch):
    nn = torch.nn
    mlp = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return mlp, conv


def torch_data(torch, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sin().sum(1, keepdim=True) + 0.5 * x[:, 4:5] ** 2)
    imgs = torch.randn(256, 1, 16, 16, generator=g)
    labels = (imgs[:, :, :8].mean((1, 2, 3)) > imgs[:, :, 8:].mean((1, 2, 3))).long()
    imgs[labels == 1, :, :8] += 0.5
    return x.to(device), y.to(device), imgs.to(device), labels.to(device)


def torch_train(torch, model, x, y, steps, loss_fn, lr=1e-2, autocast=None, opt=None):
    """Train for `steps`; autocast=(device type, dtype) runs the forward pass in mixed precision."""
    opt = opt if opt is not None else torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if autocast is not None:
            with torch.autocast(autocast[0], dtype=autocast[1]):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def torch_placements(model, opt):
    """Device type of every parameter and every optimizer state tensor ('step' counters stay on the host
    by design in torch's optimizers, so they are left out)."""
    placements = {f"param {name}": p.device.type for name, p in model.named_parameters()}
    for i, state in enumerate(opt.state.values()):
        for key, value in state.items():
            if key != "step" and hasattr(value, "device") and getattr(value, "dim", lambda: 0)() > 0:
                placements[f"optimizer {key}[{i}]"] = value.device.type
    return placements


def conv_backend_verdict(report, device_type, backend, kernels, cudnn_version):
    """gpu.cudnn_conv: the backend torch selects for the convolution (and the kernels seen) is cuDNN."""
    values = {"backend": backend, "kernels": kernels[:10], "cudnn": cudnn_version}
    if device_type != "cuda":
        return report.add("gpu.cudnn_conv", backend is not None, f"{device_type} device: convolution ran through "
                          f"{backend} (cuDNN applies only on CUDA)", **values)
    by_backend = backend is not None and backend.startswith("Cudnn")
    by_kernel = any("cudnn" in k.lower() for k in kernels)
    ok = by_backend or (backend is None and by_kernel)
    how = f"torch selected {backend}" if backend else "no backend selector in this torch"
    if by_kernel:
        how += "; kernels include " + next(k for k in kernels if "cudnn" in k.lower())[:80]
    return report.add("gpu.cudnn_conv", ok, ("convolution ran through cuDNN " + str(cudnn_version) + ": " + how)
                      if ok else "convolution did not go through cuDNN: " + how, **values)


def _device_assert_source():
    return ("import sys, torch\nd = sys.argv[1]\nx = torch.zeros(4, device=d)\n"
            "x[torch.tensor([7], device=d)] = 1.0\nprint(float(x.sum()))\n")


def _all_reduce_worker(rank, world, port, backend, timeout_s, nbytes, iters, results):
    try:
        import torch
        import torch.distributed as dist

        device = "cpu"
        if backend == "nccl":  # the device first: NCCL binds its communicator to the current device at init
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))

        def sync():
            if backend == "nccl":
                torch.cuda.synchronize()

        t = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(t)
        value = float(t[0])
        buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        for _ in range(2):
            dist.all_reduce(buf)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        sync()
        seconds = (time.perf_counter() - t0) / iters
        results.put({"rank": rank, "value": value, "seconds": seconds})
        dist.destroy_process_group()
    except Exception as exc:  # reported by the parent as this rank's failure
        results.put({"rank": rank, "error": f"rank {rank}: {type(exc).__name__}: {first_line(exc)}"})


def torch_all_reduce(torch, report, world, backend, timeout_s=ALL_REDUCE_TIMEOUT, start=None):
    """An all-reduce across `world` processes, one per GPU (NCCL), bounded by `timeout_s` in all.
    `start` ranks are started (default all): fewer lets a test see the bound work."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nbytes, iters = (256 * 2**20, 20) if backend == "nccl" else (4 * 2**20, 5)
    ctx = multiprocessing.get_context("spawn")
    results_q = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(rank, world, port, backend, timeout_s, nbytes, iters,
                                                          results_q), daemon=True)
             for rank in range(world if start is None else start)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 30  # the workers' own timeout first, then this one
    results = []
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(results_q.get(timeout=1))
            except queue_module.Empty:
                if all(not p.is_alive() for p in procs) and results_q.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5, deadline - time.monotonic())))
            if p.is_alive():
                p.terminate()
                p.join(5)
    return all_reduce_verdict(report, backend, world, results, nbytes, len(procs), [p.exitcode for p in procs])


def model_input_seed():
    return 0


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_verdict(report, model, where, load_seconds, shape, finite, forward_seconds, seen_sha256=None):
    """A baked model's check: it loaded from the image, its file is the pinned one (where the hub keeps the file
    whole), and one forward pass on a fixed input kept the batch and gave finite numbers."""
    name = f"model.{model['name']}"
    values = {"model": model["name"], "hub": model["hub"], "sha256": model["sha256"], "path": where,
              "load_seconds": round(load_seconds, 3), "forward_seconds": round(forward_seconds, 3),
              "output_shape": list(shape)}
    if seen_sha256 is not None and seen_sha256 != model["sha256"]:
        return report.add(name, False, f"{where} has sha256 {seen_sha256}, the cell pins {model['sha256']}",
                          **values)
    batch = model["input"][0]
    if not shape or shape[0] != batch:
        return report.add(name, False, f"forward pass gave shape {list(shape)}, not a batch of {batch}", **values)
    if not finite:
        return report.add(name, False, f"forward pass on a fixed input gave non-finite values {list(shape)}",
                          **values)
    return report.add(name, True, f"loaded offline from {where} in {load_seconds:.2f} s; forward pass "
                      f"{list(model['input'])} -> {list(shape)}", **values)


def model_checks(adapter, report, claims):
    for model in (claims or {}).get("models") or []:
        report.guard(f"model.{model['name']}", lambda m=model: model_verdict(report, m, *adapter.load_model(m)))


class TorchAdapter(Adapter):
    name = "torch"
    module = "torch"
    distributions = ("torch", "torchvision", "triton", "numpy")

    def inventory(self):
        torch = self.fw
        nccl = None
        try:
            nccl = ".".join(str(p) for p in torch.cuda.nccl.version()) if torch.version.cuda else None
        except Exception:
            nccl = None
        gpus = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                             "memory_gb": round(props.total_memory / 2**30, 1)})
        cudnn = cudnn_compiled = None
        try:
            cudnn = decode_cudnn(torch.backends.cudnn.version())
            compiled = torch._C._cudnn.getCompileVersion() if hasattr(torch._C, "_cudnn") else None
            cudnn_compiled = ".".join(str(p) for p in compiled) if compiled else None
        except Exception:
            pass
        try:
            arch_list = torch.cuda.get_arch_list()
        except Exception:
            arch_list = []
        return {"framework_version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                "cudnn_source": "torch.backends.cudnn.version()" if cudnn else None,
                "cudnn_compiled": cudnn_compiled, "nccl": nccl, "gpus": gpus, "arch_list": arch_list,
                "packages": self.packages()}

    def gpu_count(self):
        return self.fw.cuda.device_count() if self.fw.cuda.is_available() else 0

    def no_gpu_reasons(self, inv):
        torch = self.fw
        reasons = []
        if torch.version.cuda is None:
            reasons.append("CPU-only build of torch (torch.version.cuda is None)")
        try:
            torch.cuda.init()
        except Exception as exc:
            reasons.append(f"torch.cuda.init(): {type(exc).__name__}: {first_line(exc)}")
        return reasons

    def device_usable(self, index):
        t = self.fw.arange(4.0, device=f"cuda:{index}")
        return float((t * 2).sum().cpu()) == 12.0

    def train_cpu(self, report, args, inv):
        torch = self.fw
        torch.manual_seed(0)
        mlp, conv = torch_models(torch)
        x, y, imgs, labels = torch_data(torch)
        mse, xent = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        report.guard("train.cpu.mlp", lambda: falls(report, "train.cpu.mlp", torch_train(
            torch, mlp, x, y, args.steps, mse), LOSS_FRACTION["mlp"]))
        report.guard("train.cpu.conv", lambda: falls(report, "train.cpu.conv", torch_train(
            torch, conv, imgs, labels, args.steps // 2, xent), LOSS_FRACTION["conv"]))
        inv["cpu_train_seconds"] = round(time.perf_counter() - t0, 2)

        def checkpoint():
            buf = io.BytesIO()
            torch.save(mlp.state_dict(), buf)
            buf.seek(0)
            fresh, _ = torch_models(torch)
            fresh.load_state_dict(torch.load(buf))
            with torch.no_grad():
                same = torch.equal(mlp(x), fresh(x))
            return report.add("checkpoint", same, "saved and reloaded model gives bit-identical outputs"
                              if same else "reloaded model's outputs differ", bytes=buf.getbuffer().nbytes)

        report.guard("checkpoint", checkpoint)

    def compile_check(self, report, args, inv, compile_fn=None):
        torch = self.fw
        compilers = [c for c in (os.environ.get("CXX"), *COMPILERS) if c and shutil.which(c)]
        if not compilers and getattr(args, "devel", False):
            report.add("compile.torch", False, "no C/C++ compiler in a devel image: torch.compile (inductor) "
                       "needs one there", compiler=None)
            return
        if not compilers:
            report.skip("compile.torch", "no C/C++ compiler in the image, which torch.compile (inductor) needs: "
                        "not tried; expected in a runtime image", compiler=None)
            return
        device = "cuda" if self.gpu_count() and args.gpu != "off" else "cpu"
        compile_fn = compile_fn or torch.compile

        def run():
            t0 = time.perf_counter()
            fn = compile_fn(lambda v: torch.sin(v) + torch.cos(v) * 2)
            x = torch.linspace(-3, 3, 256, device=device)
            same = bool(torch.allclose(fn(x), torch.sin(x) + torch.cos(x) * 2, atol=1e-5))
            return report.add("compile.torch", same, f"torch.compile on {device} with {compilers[0]}: "
                              + ("matches eager" if same else "differs from eager"), compiler=compilers[0],
                              device=device, seconds=round(time.perf_counter() - t0, 1))

        report.guard("compile.torch", run)

    def gpu_checks(self, report, args, inv):
        torch_gpu(self.fw, report, args, inv)

    def devel_checks(self, report, args, inv):
        torch_devel(self.fw, report, args, inv, gpu=bool(self.gpu_count()) and args.gpu != "off")

    def load_model(self, model):
        torch = self.fw
        torchvision = importlib.import_module("torchvision")
        name = os.path.basename(urllib.parse.urlsplit(model["url"]).path)
        where = os.path.join(torch.hub.get_dir(), "checkpoints", name)
        t0 = time.perf_counter()
        state = torch.hub.load_state_dict_from_url(model["url"], map_location="cpu", progress=False)
        net = torchvision.models.get_model(model["arch"], weights=None)
        net.load_state_dict(state)
        loaded = time.perf_counter() - t0
        net.eval()
        x = torch.rand(*model["input"], generator=torch.Generator().manual_seed(model_input_seed()))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = net(x)
        forward = time.perf_counter() - t0
        return (where, loaded, tuple(out.shape), bool(torch.isfinite(out).all()), forward, file_sha256(where))


def torch_gpu(torch, report, args, inv, device="cuda:0", world=None):
    """The GPU checks. `device` and `world` let the same code run on the CPU (gloo) in the payload's tests."""
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    gpu = inv["gpus"][0] if on_cuda else {}
    model = gpu.get("name", device)
    capability = gpu.get("capability")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report.guard("gpu.arch_supported", lambda: arch_verdict(report, capability, inv.get("arch_list")))
    if on_cuda:
        report.guard("gpu.cudnn_runtime_vs_compile", lambda: cudnn_compat_verdict(
            report, inv.get("cudnn"), inv.get("cudnn_compiled"), "torch.backends.cudnn.version()"))
    else:
        report.skip("gpu.cudnn_runtime_vs_compile", "CPU device: no cuDNN")
    torch.manual_seed(0)
    mlp, conv = torch_models(torch)
    x, y, imgs, _ = torch_data(torch)

    def cudnn_conv():
        first = conv[0]
        dev_in = imgs.to(dev)
        torch.backends.cudnn.enabled = True
        backend = None
        if hasattr(torch._C, "_select_conv_backend"):
            backend = str(torch._C._select_conv_backend(
                dev_in, first.weight.to(dev), first.bias.to(dev), list(first.stride), list(first.padding),
                list(first.dilation), False, [0, 0], first.groups)).split(".")[-1]
        kernels = []
        layer = torch.nn.Conv2d(1, 8, 3, padding=1).to(dev)
        if on_cuda:
            try:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
                    layer(dev_in)
                    sync()
                kernels = sorted({e.key for e in prof.key_averages()})
            except Exception as exc:  # the profiler is evidence, the selected backend is the proof
                kernels = [f"profiler failed: {type(exc).__name__}: {first_line(exc)}"]
        return conv_backend_verdict(report, dev.type, backend, kernels, inv.get("cudnn"))

    report.guard("gpu.cudnn_conv", cudnn_conv)

    def matches_cpu():
        with torch.no_grad():
            cpu_out = conv(imgs)
            dev_out = conv.to(dev)(imgs.to(dev))
            sync()
        diff = float((dev_out.cpu() - cpu_out).abs().max())
        return report.add("gpu.matches_cpu", diff < GPU_CPU_TOLERANCE, f"max |GPU - CPU| = {diff:.2e} "
                          f"(tolerance {GPU_CPU_TOLERANCE:.0e}, TF32 off)", max_abs_diff=diff,
                          tolerance=GPU_CPU_TOLERANCE)

    report.guard("gpu.matches_cpu", matches_cpu)

    def tf32_run(tf32):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            a = torch.full((64, TF32_K), TF32_VALUE, device=dev)
            b = torch.ones((TF32_K, 64), device=dev)
            img = torch.full((1, TF32_K, 8, 8), TF32_VALUE, device=dev)
            w = torch.ones((1, TF32_K, 1, 1), device=dev)
            with torch.no_grad():
                mm = float((a @ b)[0, 0])
                cv = float(torch.nn.functional.conv2d(img, w)[0, 0, 0, 0])
            return {"matmul": mm, "conv": cv}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    report.guard("gpu.tf32_off", lambda: tf32_verdict(report, tf32_run))
    dtype_name = mixed_dtype(dev.type, capability)
    dtype = getattr(torch, dtype_name)
    inv["mixed_precision_dtype"] = dtype_name
    report.guard("gpu.bf16_native", lambda: bf16_verdict(report, dev.type, capability, dtype_name))

    def train():
        mlp_dev = mlp.to(dev)
        opt = torch.optim.Adam(mlp_dev.parameters(), lr=1e-2)
        t0 = time.perf_counter()
        losses = torch_train(torch, mlp_dev, x.to(dev), y.to(dev), args.steps, torch.nn.MSELoss(),
                             autocast=(dev.type, dtype), opt=opt)
        sync()
        inv["gpu_train_steps_per_second"] = round(args.steps / (time.perf_counter() - t0), 1)
        falls(report, "gpu.train_mixed_precision", losses, LOSS_FRACTION["mlp"])
        placement_verdict(report, dev.type, torch_placements(mlp_dev, opt))

    report.guard("gpu.train_mixed_precision", train)

    def matmul():
        n = matmul_size(dev.type, gpu.get("memory_gb"))
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        reps = 50 if on_cuda else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
        inv["matmul_tflops"] = {"dtype": dtype_name, "n": n, "tflops": round(tflops, 3)}
        return matmul_verdict(report, tflops, model, dtype_name, n)

    report.guard("gpu.matmul", matmul)

    def linalg():
        previous = torch.backends.cuda.preferred_linalg_library() if on_cuda else None
        if on_cuda:
            torch.backends.cuda.preferred_linalg_library("cusolver")
        try:
            errors = {}
            g = torch.Generator().manual_seed(1)
            for name in ("float32", "float64"):
                dt = getattr(torch, name)
                a = torch.randn(256, 256, generator=g, dtype=dt) + 16 * torch.eye(256, dtype=dt)
                b = torch.randn(256, 8, generator=g, dtype=dt)
                spd = a @ a.T + 256 * torch.eye(256, dtype=dt)
                ad, bd, sd = a.to(dev), b.to(dev), spd.to(dev)
                sol = torch.linalg.solve(ad, bd)
                residual = float((ad @ sol - bd).norm() / bd.norm())
                chol = torch.linalg.cholesky(sd).cpu()
                want = torch.linalg.cholesky(spd)
                mm = (ad @ bd).cpu()
                errors[name] = {"solve": residual, "cholesky": float((chol - want).norm() / want.norm()),
                                "matmul": float((mm - a @ b).norm() / (a @ b).norm())}
            return linalg_verdict(report, errors)
        finally:
            if on_cuda:
                torch.backends.cuda.preferred_linalg_library(previous)

    report.guard("gpu.linalg", linalg)

    def h2d():
        if not on_cuda:
            report.skip("gpu.h2d_bandwidth", "CPU device: no host-to-device copy to measure")
            return
        nbytes = 256 * 2**20
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        target.copy_(host, non_blocking=True)
        sync()
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            target.copy_(host, non_blocking=True)
        sync()
        bandwidth_verdict(report, nbytes * reps / (time.perf_counter() - t0) / 1e9, nbytes=nbytes)

    report.guard("gpu.h2d_bandwidth", h2d)

    def device_assert():
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        proc = subprocess.run([sys.executable, "-c", _device_assert_source(), str(dev)], capture_output=True,
                              text=True, timeout=120, env=env)
        return device_assert_verdict(report, dev.type, proc.returncode, proc.stdout + proc.stderr)

    report.guard("gpu.device_assert", device_assert)
    world = world if world is not None else torch.cuda.device_count()
    if world >= 2:
        backend = "nccl" if on_cuda else "gloo"
        timeout = getattr(args, "all_reduce_timeout", ALL_REDUCE_TIMEOUT)
        report.guard("gpu.all_reduce", lambda: torch_all_reduce(torch, report, world, backend, timeout))
    else:
        report.skip("gpu.all_reduce", "one GPU: no all-reduce to run")


# ------------------------------------------------------------------------------------------ tensorflow
def tf_data(np):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype("float32")
    y = (np.sin(x[:, :4]).sum(1, keepdims=True) + 0.5 * x[:, 4:5] ** 2).astype("float32")
    imgs = rng.standard_normal((256, 16, 16, 1)).astype("float32")
    labels = (imgs[:, :8].mean((1, 2, 3)) > imgs[:, 8:].mean((1, 2, 3))).astype("int64")
    imgs[labels == 1, :8] += 0.5
    return x, y, imgs, labels


def tf_mlp(tf, keras):
    tf.keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="tanh"),
                             keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(1)])


def tf_conv(tf, keras):
    tf.keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                             keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])


def tf_fit(keras, model, data, target, loss, epochs):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    return [float(v) for v in model.fit(data, target, epochs=epochs, batch_size=64, verbose=0,
                                         shuffle=False).history["loss"]]


def tf_variable_device(var):
    """A variable's device string: Keras 2 variables have .device, Keras 3 ones keep it on .value."""
    for obj in (var, getattr(var, "value", None), getattr(var, "_value", None)):
        device = getattr(obj, "device", None) if obj is not None else None
        if isinstance(device, str) and device:
            return device
    return ""


def tf_device_type(device):
    match = re.search(r"(?:device:)?([A-Za-z]+):\d+$", device or "")
    return match.group(1).lower() if match else "unknown"


def tf_placements(model):
    """Device type of every float variable of the model and of its optimizer (integer step counters may
    stay on the host by design)."""
    placements = {}
    for var in model.variables:
        placements[f"param {getattr(var, 'path', None) or var.name}"] = tf_device_type(tf_variable_device(var))
    for var in list(model.optimizer.variables):
        if "float" in str(var.dtype):
            name = getattr(var, "path", None) or var.name
            placements[f"optimizer {name}"] = tf_device_type(tf_variable_device(var))
    return placements


def cudnn_mapped_version():
    """(version, paths) of the libcudnn this process has actually mapped, or (None, [])."""
    paths = mapped_libraries(r"^libcudnn")
    main = [p for p in paths if re.match(r"libcudnn\.so", os.path.basename(p))]
    version = None
    if main:
        try:
            version = _cudnn_version_of(main[0])
        except (OSError, AttributeError):
            version = None
    return version, paths


def tf_cudnn_verdict(report, device_type, out_device, mapped_paths, mapped_version):
    values = {"output_device": out_device, "mapped": mapped_paths, "mapped_version": decode_cudnn(mapped_version)}
    if device_type == "cpu":
        return report.add("gpu.cudnn_conv", tf_device_type(out_device) == "cpu", f"CPU device: convolution ran on "
                          f"{out_device} (cuDNN applies only on a GPU)", **values)
    on_gpu = tf_device_type(out_device) == "gpu"
    ok = on_gpu and bool(mapped_paths)
    detail = (f"convolution ran on {out_device} with {os.path.basename(mapped_paths[0])} "
              f"{decode_cudnn(mapped_version) or '(version unread)'} mapped" if ok else
              f"convolution output on {out_device}; libcudnn mapped: {mapped_paths or 'none'}")
    return report.add("gpu.cudnn_conv", ok, detail, **values)


class TensorFlowAdapter(Adapter):
    name = "tensorflow"
    module = "tensorflow"
    distributions = ("tensorflow", "tensorflow-cpu", "tf-nightly", "keras", "numpy")

    def __init__(self):
        self.log = []
        self.gpus = []

    def load(self):
        with native_stderr(self.log):
            tf = importlib.import_module("tensorflow")
            self.gpus = tf.config.list_physical_devices("GPU")
            for gpu in self.gpus:  # before any GPU is used: TF must not take every GPU's memory
                tf.config.experimental.set_memory_growth(gpu, True)
        self.fw = tf
        return tf

    def inventory(self):
        tf = self.fw
        info = dict(tf.sysconfig.get_build_info())
        details = []
        for gpu in self.gpus:
            d = tf.config.experimental.get_device_details(gpu)
            cap = d.get("compute_capability")
            details.append({"name": d.get("device_name", gpu.name),
                            "capability": ".".join(map(str, cap)) if cap else None, "memory_gb": None})
        cuda_build = bool(info.get("is_cuda_build"))
        probe = cudnn_probe()
        measured = decode_cudnn(probe.get("version"))
        packages = self.packages()
        return {"framework_version": tf.__version__, "cuda": info.get("cuda_version") if cuda_build else None,
                "cudnn": measured, "cudnn_source": f"cudnnGetVersion() of {probe.get('path')}" if measured else None,
                "cudnn_library": probe, "cudnn_compiled": info.get("cudnn_version") if cuda_build else None,
                "nccl": None, "gpus": details, "arch_list": info.get("cuda_compute_capabilities") or [],
                "keras": packages.get("keras") or getattr(tf.keras, "__version__", None), "packages": packages}

    def gpu_count(self):
        return len(self.gpus)

    def no_gpu_reasons(self, inv):
        reasons = []
        if not dict(self.fw.sysconfig.get_build_info()).get("is_cuda_build"):
            reasons.append("CPU-only build of TensorFlow (is_cuda_build is False)")
        keys = r"Skipping registering GPU|cuInit|cuda drivers|Cannot dlopen|CUDA_ERROR|GPU will not be used"
        reasons += [f"TensorFlow: {line.strip()[-300:]}" for line in self.log if re.search(keys, line)][:4]
        return reasons

    def device_usable(self, index):
        tf = self.fw
        with tf.device(f"/GPU:{index}"):
            t = tf.range(4.0) * 2
        return "GPU" in t.device and float(tf.reduce_sum(t)) == 12.0

    def train_cpu(self, report, args, inv):
        tf = self.fw
        np = importlib.import_module("numpy")
        keras = tf.keras
        x, y, imgs, labels = tf_data(np)
        epochs = max(5, args.steps // 10)
        t0 = time.perf_counter()
        with tf.device("/CPU:0"):
            model = tf_mlp(tf, keras)
            report.guard("train.cpu.mlp", lambda: falls(report, "train.cpu.mlp", tf_fit(
                keras, model, x, y, "mse", epochs), LOSS_FRACTION["mlp"]))
            xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            report.guard("train.cpu.conv", lambda: falls(report, "train.cpu.conv", tf_fit(
                keras, tf_conv(tf, keras), imgs, labels, xent, epochs), LOSS_FRACTION["conv"]))
        inv["cpu_train_seconds"] = round(time.perf_counter() - t0, 2)

        def checkpoint():
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.keras")
                model.save(path)
                fresh = keras.models.load_model(path)
                same = bool(np.array_equal(model.predict(x, verbose=0), fresh.predict(x, verbose=0)))
                size = os.path.getsize(path)
            return report.add("checkpoint", same, "saved and reloaded model gives bit-identical outputs"
                              if same else "reloaded model's outputs differ", bytes=size)

        report.guard("checkpoint", checkpoint)

    def load_model(self, model):
        tf = self.fw
        with native_stderr(self.log):
            hub = importlib.import_module("tensorflow_hub")
            t0 = time.perf_counter()
            where = hub.resolve(model["url"])
            module = hub.load(model["url"])
            loaded = time.perf_counter() - t0
            x = tf.random.stateless_uniform(model["input"], seed=(model_input_seed(), 0))
            t0 = time.perf_counter()
            if callable(module):
                out = module(x)
            else:
                signature = module.signatures["serving_default"]
                out = signature(**{next(iter(signature.structured_input_signature[1])): x})
            if isinstance(out, dict):
                out = next(iter(out.values()))
            forward = time.perf_counter() - t0
        return (where, loaded, tuple(out.shape), bool(tf.reduce_all(tf.math.is_finite(out))), forward, None)

    def gpu_checks(self, report, args, inv):
        tf_gpu(self.fw, report, args, inv)


def tf_gpu(tf, report, args, inv, device="/GPU:0", devices=None):
    """The GPU checks. `device` and `devices` let the same code run on CPU devices in the payload's tests."""
    np = importlib.import_module("numpy")
    keras = tf.keras
    device_type = tf_device_type(device)
    on_gpu = device_type == "gpu"
    gpu = inv["gpus"][0] if on_gpu else {}
    model_name = gpu.get("name", device)
    capability = gpu.get("capability")
    x, y, imgs, _ = tf_data(np)

    def sync(t=None):
        if hasattr(tf.test, "experimental") and hasattr(tf.test.experimental, "sync_devices"):
            tf.test.experimental.sync_devices()
        elif t is not None:  # a scalar, not the whole result, crosses to the host
            float(tf.reduce_sum(tf.cast(t[:1, :1], tf.float32)))

    tf.config.experimental.enable_tensor_float_32_execution(False)
    report.guard("gpu.arch_supported", lambda: arch_verdict(report, capability, inv.get("arch_list")))
    conv = tf_conv(tf, keras)
    with tf.device("/CPU:0"):
        cpu_out = conv(imgs).numpy()

    def cudnn_conv():
        with tf.device(device):
            out = conv(tf.constant(imgs))
        out_device = out.device
        out.numpy()
        version, paths = cudnn_mapped_version()
        inv["cudnn_mapped"] = {"version": decode_cudnn(version), "paths": paths}
        tf_cudnn_verdict(report, "gpu" if on_gpu else "cpu", out_device, paths, version)
        diff = float(np.abs(out.numpy() - cpu_out).max())
        return report.add("gpu.matches_cpu", diff < GPU_CPU_TOLERANCE, f"max |GPU - CPU| = {diff:.2e} "
                          f"(tolerance {GPU_CPU_TOLERANCE:.0e}, TF32 off)", max_abs_diff=diff,
                          tolerance=GPU_CPU_TOLERANCE)

    report.guard("gpu.cudnn_conv", cudnn_conv)

    def cudnn_compat():
        mapped = (inv.get("cudnn_mapped") or {}).get("version")
        if not on_gpu:
            report.skip("gpu.cudnn_runtime_vs_compile", "CPU device: no cuDNN mapped")
            return
        if mapped and inv.get("cudnn") and mapped != inv["cudnn"]:
            report.add("gpu.cudnn_runtime_vs_compile", False, f"TensorFlow maps cuDNN {mapped}, but the image's "
                       f"library path gives {inv['cudnn']}", runtime=mapped, measured=inv["cudnn"])
            return
        cudnn_compat_verdict(report, mapped, inv.get("cudnn_compiled"), "the libcudnn mapped after a conv")

    report.guard("gpu.cudnn_runtime_vs_compile", cudnn_compat)

    def tf32_run(tf32):
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
        try:
            with tf.device(device):
                a = tf.fill((64, TF32_K), TF32_VALUE)
                b = tf.ones((TF32_K, 64))
                img = tf.fill((1, 8, 8, TF32_K), TF32_VALUE)
                w = tf.ones((1, 1, TF32_K, 1))
                mm = float(tf.linalg.matmul(a, b)[0, 0])
                cv = float(tf.nn.conv2d(img, w, 1, "VALID")[0, 0, 0, 0])
            return {"matmul": mm, "conv": cv}
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(False)

    report.guard("gpu.tf32_off", lambda: tf32_verdict(report, tf32_run))
    dtype_name = mixed_dtype("gpu" if on_gpu else "cpu", capability)
    inv["mixed_precision_dtype"] = dtype_name
    report.guard("gpu.bf16_native", lambda: bf16_verdict(report, "gpu" if on_gpu else "cpu", capability,
                                                           dtype_name))
    policy = "mixed_bfloat16" if dtype_name == "bfloat16" else "mixed_float16"

    def train():
        epochs = max(5, args.steps // 10)
        keras.mixed_precision.set_global_policy(policy)
        try:
            with tf.device(device):
                model = tf_mlp(tf, keras)
                t0 = time.perf_counter()
                losses = tf_fit(keras, model, x, y, "mse", epochs)
                seconds = time.perf_counter() - t0
        finally:
            keras.mixed_precision.set_global_policy("float32")
        inv["gpu_train_steps_per_second"] = round(epochs * (len(x) // 64) / seconds, 1)
        falls(report, "gpu.train_mixed_precision", losses, LOSS_FRACTION["mlp"])
        placement_verdict(report, "gpu" if on_gpu else "cpu", tf_placements(model))

    report.guard("gpu.train_mixed_precision", train)

    def matmul():
        n = matmul_size("gpu" if on_gpu else "cpu", gpu.get("memory_gb") or (80 if on_gpu else 0))
        dtype = getattr(tf, dtype_name)
        with tf.device(device):
            a = tf.cast(tf.random.normal((n, n)), dtype)
            c = tf.linalg.matmul(a, a)
            sync(c)
            reps = 50 if on_gpu else 5
            t0 = time.perf_counter()
            for _ in range(reps):
                c = tf.linalg.matmul(a, a)
            sync(c)
            seconds = time.perf_counter() - t0
        tflops = 2 * n**3 * reps / seconds / 1e12
        inv["matmul_tflops"] = {"dtype": dtype_name, "n": n, "tflops": round(tflops, 3)}
        return matmul_verdict(report, tflops, model_name, dtype_name, n)

    report.guard("gpu.matmul", matmul)

    def linalg():
        errors = {}
        rng = np.random.default_rng(1)
        for name in ("float32", "float64"):
            a = (rng.standard_normal((256, 256)) + 16 * np.eye(256)).astype(name)
            b = rng.standard_normal((256, 8)).astype(name)
            spd = a @ a.T + 256 * np.eye(256, dtype=name)
            with tf.device(device):
                ad, bd = tf.constant(a), tf.constant(b)
                sol = tf.linalg.solve(ad, bd)
                residual = float(tf.norm(ad @ sol - bd) / tf.norm(bd))
                chol = tf.linalg.cholesky(tf.constant(spd)).numpy()
                mm = tf.linalg.matmul(ad, bd).numpy()
            want = np.linalg.cholesky(spd)
            errors[name] = {"solve": residual,
                            "cholesky": float(np.linalg.norm(chol - want) / np.linalg.norm(want)),
                            "matmul": float(np.linalg.norm(mm - a @ b) / np.linalg.norm(a @ b))}
        return linalg_verdict(report, errors)

    report.guard("gpu.linalg", linalg)
    report.skip("gpu.h2d_bandwidth", "TensorFlow has no pinned-memory API to measure host-to-device copies with")

    def device_assert():
        # TF's GPU gather writes 0 for an out-of-range index instead of asserting, so the device-side
        # error path is proven with check_numerics, a kernel that reports what it finds on the device.
        with tf.device(device):
            bad = tf.constant([1.0, float("nan")])
            try:
                tf.debugging.check_numerics(bad, "payload probe").numpy()
            except tf.errors.InvalidArgumentError as exc:
                return report.add("gpu.device_assert", True, f"a NaN found on {device} was reported: "
                                  f"{first_line(exc.message)[:120]}")
        return report.add("gpu.device_assert", False, f"check_numerics on {device} let a NaN through")

    report.guard("gpu.device_assert", device_assert)
    devices = devices if devices is not None else [f"/GPU:{i}" for i in range(len(inv["gpus"]))]
    if len(devices) >= 2:
        report.guard("gpu.all_reduce", lambda: tf_all_reduce(tf, report, devices))
    else:
        report.skip("gpu.all_reduce", "one GPU: no all-reduce to run")


def tf_all_reduce(tf, report, devices):
    """A MirroredStrategy all-reduce over `devices` (NCCL between GPUs), with its bus bandwidth."""
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    world = len(devices)
    nbytes = (256 if "GPU" in devices[0].upper() else 4) * 2**20

    def value_fn(ctx):
        return tf.fill((1024,), float(ctx.replica_id_in_sync_group + 1))

    def buffer_fn(ctx):
        return tf.zeros((nbytes // 4,))

    reduce_ = strategy.extended.reduce_to  # the cross-device all-reduce MirroredStrategy runs in training
    small = strategy.experimental_distribute_values_from_function(value_fn)
    per_device = strategy.experimental_local_results(reduce_(tf.distribute.ReduceOp.SUM, small, small))
    values = [float(t[0]) for t in per_device]
    big = strategy.experimental_distribute_values_from_function(buffer_fn)
    reduce_(tf.distribute.ReduceOp.SUM, big, big)
    iters = 5
    t0 = time.perf_counter()
    for _ in range(iters):
        out = reduce_(tf.distribute.ReduceOp.SUM, big, big)
    float(tf.reduce_sum(strategy.experimental_local_results(out)[0][:1]))
    seconds = (time.perf_counter() - t0) / iters
    results = [{"rank": i, "value": v, "seconds": seconds} for i, v in enumerate(values)]
    backend = "nccl" if "GPU" in devices[0].upper() else "tf-cpu"
    return all_reduce_verdict(report, backend, world, results, nbytes, world)


# ----------------------------------------------------------------------------------------------- devel
DEVEL_KERNEL = r"""
extern "C" __global__ void axpy(int n, float a, const float *x, float *y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""
DEVEL_EXT_CU = DEVEL_KERNEL + r"""
void axpy_launch(int n, float a, const float *x, float *y) { axpy<<<(n + 255) / 256, 256>>>(n, a, x, y); }
"""
DEVEL_EXT_CPP = r"""
#include <torch/extension.h>
void axpy_launch(int n, float a, const float *x, float *y);
torch::Tensor axpy(double a, torch::Tensor x, torch::Tensor y) {
    TORCH_CHECK(x.is_cuda() && y.is_cuda(), "axpy: CUDA tensors only");
    auto out = y.clone();
    axpy_launch(x.numel(), static_cast<float>(a), x.data_ptr<float>(), out.data_ptr<float>());
    return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("axpy", &axpy); }
"""
# The arch every devel image must compile for, whatever else the framework lists (Hopper).
DEVEL_ARCH = "sm_90"
GPU_RUN_UNVERIFIED = "unverified until a GPU host with Docker certifies it"


def nvcc_release(text):
    """'13.0' from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"); None if absent."""
    found = re.search(r"release (\d+\.\d+)", text or "")
    return found.group(1) if found else None


def toolkit_verdict(report, nvcc_text, framework_cuda):
    release = nvcc_release(nvcc_text)
    ok = release is not None and release == major_minor(framework_cuda)
    return report.add("devel.cuda_version", ok, f"nvcc {release or 'unknown'}, torch built with CUDA "
                      f"{framework_cuda}" + ("" if ok else ": they differ"), nvcc=release, framework=framework_cuda)


def torch_arches(torch):
    """The sm_XX the torch wheel was built for (readable without a GPU), with sm_90 always included."""
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
    arches = sorted({a for a in flags.split() if a.startswith("sm_")} | {DEVEL_ARCH}, key=lambda a: int(a[3:]))
    return arches


def run_tool(command, cwd, timeout=600):
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} exited {proc.returncode}: "
                           + (proc.stderr or proc.stdout).strip())
    return proc.stdout + proc.stderr


def nvcc_check(report, nvcc, arches, work):
    """Compile the kernel with nvcc: a cubin and PTX for sm_90, and a fatbin with SASS for every arch."""
    src = os.path.join(work, "axpy.cu")
    with open(src, "w") as fh:
        fh.write(DEVEL_KERNEL)
    t0 = time.perf_counter()
    num = DEVEL_ARCH[3:]
    run_tool([nvcc, "-cubin", f"-arch={DEVEL_ARCH}", "-o", "axpy.cubin", src], work)
    run_tool([nvcc, "-ptx", f"-arch=compute_{num}", "-o", "axpy.ptx", src], work)
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in arches]
    gencode.append(f"-gencode=arch=compute_{arches[-1][3:]},code=compute_{arches[-1][3:]}")
    run_tool([nvcc, "-fatbin", *gencode, "-o", "axpy.fatbin", src], work)
    with open(os.path.join(work, "axpy.cubin"), "rb") as fh:
        cubin = fh.read()
    with open(os.path.join(work, "axpy.ptx")) as fh:
        ptx = fh.read()
    fatbin = os.path.getsize(os.path.join(work, "axpy.fatbin"))
    problems = []
    if not cubin.startswith(b"\x7fELF"):
        problems.append("the cubin is no ELF file")
    if f".target {DEVEL_ARCH}" not in ptx or ".entry axpy" not in ptx:
        problems.append(f"the PTX has no .target {DEVEL_ARCH} entry axpy")
    if fatbin <= len(cubin):
        problems.append(f"the fatbin ({fatbin} bytes) is no larger than one cubin ({len(cubin)})")
    return report.add("devel.nvcc", not problems, "; ".join(problems) or f"nvcc compiled a kernel: cubin and PTX "
                      f"for {DEVEL_ARCH}, a fatbin for {', '.join(arches)} (+PTX)", arches=arches,
                      cubin_bytes=len(cubin), ptx_bytes=len(ptx), fatbin_bytes=fatbin,
                      seconds=round(time.perf_counter() - t0, 1), gpu_run=GPU_RUN_UNVERIFIED)


def extension_check(torch, report, work, gpu):
    """Build and import a CUDA extension with torch.utils.cpp_extension; with a GPU, run it against a reference."""
    from torch.utils import cpp_extension

    os.environ["TORCH_CUDA_ARCH_LIST"] = DEVEL_ARCH[3] + "." + DEVEL_ARCH[4:]  # "9.0": explicit, one arch
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    t0 = time.perf_counter()
    build = os.path.join(work, "ext")
    os.makedirs(build, exist_ok=True)
    module = cpp_extension.load_inline("builder_devel_axpy", cpp_sources=[DEVEL_EXT_CPP],
                                       cuda_sources=[DEVEL_EXT_CU], build_directory=build, verbose=False)
    seconds = round(time.perf_counter() - t0, 1)
    if not hasattr(module, "axpy"):
        return report.add("devel.cpp_extension", False, "the extension imported without its axpy function")
    if not gpu:
        return report.add("devel.cpp_extension", True, "built and imported a CUDA extension (TORCH_CUDA_ARCH_LIST="
                          f"{os.environ['TORCH_CUDA_ARCH_LIST']}); no GPU, so not run", seconds=seconds,
                          arch_list=os.environ["TORCH_CUDA_ARCH_LIST"], gpu_run=GPU_RUN_UNVERIFIED)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    got = module.axpy(2.0, x.cuda(), y.cuda()).cpu()
    ok = bool(torch.allclose(got, 2.0 * x + y, atol=1e-6))
    return report.add("devel.cpp_extension", ok, "the extension's kernel " + ("matches" if ok else "differs from")
                      + " the CPU reference", seconds=seconds, arch_list=os.environ["TORCH_CUDA_ARCH_LIST"],
                      gpu_run="ran on the GPU; " + GPU_RUN_UNVERIFIED)


def torch_devel(torch, report, args, inv, gpu=False):
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or os.path.join(cuda_home, "bin", "nvcc")
    inv["cuda_home"] = cuda_home
    if not os.path.exists(nvcc):
        report.add("devel.nvcc", False, f"no nvcc on PATH or in CUDA_HOME ({cuda_home})")
        return
    report.guard("devel.cuda_version", lambda: toolkit_verdict(report, run_tool([nvcc, "--version"], "/"),
                                                               torch.version.cuda))
    work = tempfile.mkdtemp(prefix="builder-devel-")
    try:
        report.guard("devel.nvcc", lambda: nvcc_check(report, nvcc, torch_arches(torch), work))
        report.guard("devel.cpp_extension", lambda: extension_check(torch, report, work, gpu))
    finally:
        shutil.rmtree(work, ignore_errors=True)


ADAPTERS = {adapter.name: adapter for adapter in (TorchAdapter(), TensorFlowAdapter())}


# ---------------------------------------------------------------------------------------------- main
def run(adapter, report, claims, args, inv, probe):
    adapter.load()
    inv.update(adapter.inventory())
    if claims:
        check_claims(report, claims, inv, adapter.name)
    adapter.train_cpu(report, args, inv)
    model_checks(adapter, report, claims)
    args.devel = (claims or {}).get("flavor") == "devel"
    if args.compile != "off" or args.devel:  # a devel image must compile: --compile off does not skip it
        adapter.compile_check(report, args, inv)
    if args.devel:
        adapter.devel_checks(report, args, inv)
    if args.gpu == "off":
        report.skip("gpu", "GPU checks switched off (--gpu off)")
        return
    seen = adapter.gpu_count()
    if seen == 0:
        causes = no_gpu_causes(probe, adapter.no_gpu_reasons(inv))
        inv["no_gpu_causes"] = causes
        if args.gpu == "require":
            report.add("gpu.visible", False, f"GPUs were requested but {adapter.name} sees none: "
                       + "; ".join(causes), seen=0, driver_count=probe.get("gpu_count"),
                       expected=args.expect_gpus, causes=causes)
        else:
            report.skip("gpu", f"no GPU visible to {adapter.name}: " + "; ".join(causes), causes=causes)
        return
    usable = []
    for i in range(seen):
        try:
            usable.append(bool(adapter.device_usable(i)))
        except Exception:
            usable.append(False)
    visible_verdict(report, seen, probe.get("gpu_count"), args.expect_gpus, inv["gpus"], usable)
    report.guard("gpu." + adapter.name, lambda: adapter.gpu_checks(report, args, inv))


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claims", help="cell.json: what the image claims; omit to only measure")
    p.add_argument("--framework", choices=sorted(ADAPTERS), help="default: the claims' framework")
    p.add_argument("--out", default=os.environ.get("BUILDER_SMOKE_OUT", "/tmp/builder-smoke/result.json"))
    p.add_argument("--gpu", choices=["auto", "off", "require"], default="auto",
                   help="auto: GPU checks when a GPU is visible; require: no visible GPU fails gpu.visible")
    p.add_argument("--expect-gpus", type=int, default=None, help="GPUs the container was given: gpu.visible "
                   "fails unless the framework sees exactly this many")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--compile", choices=["auto", "off"], default="auto",
                   help="auto: record torch.compile (skipped with the reason when the image has no compiler)")
    p.add_argument("--all-reduce-timeout", type=float, default=ALL_REDUCE_TIMEOUT,
                   help="seconds the whole multi-GPU all-reduce may take")
    p.add_argument("--cudnn-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--promises", action="store_true", help="also check what every image promises (promises.py)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.cudnn_probe:  # a fresh process: see cudnn_library()
        print(json.dumps(cudnn_library()))
        return 0
    claims = None
    if args.claims:
        with open(args.claims) as fh:
            claims = json.load(fh)
    framework = args.framework or (claims or {}).get("framework")
    if framework not in ADAPTERS:
        parser().error(f"give --claims or --framework (one of {', '.join(sorted(ADAPTERS))})")
    report = Report()
    if args.promises:  # promises.py ships beside this file; run first, before the framework writes to /tmp
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        report.guard("promise", lambda: importlib.import_module("promises").check(report, claims))
    wheels = nvidia_wheels()
    name, version = cudnn_wheel(wheels)
    ok, output = pip_check()
    probe = driver_probe()
    inv = {"python": platform.python_version(), "framework": framework, "nvidia_wheels": wheels,
           "cudnn_wheel_name": name, "cudnn_wheel": version, "pip_check": {"clean": ok, "output": output},
           "driver": probe["version"], "driver_probe": probe, "gpu_env": hidden_by_environment(),
           "framework_version": None, "cuda": None, "cudnn": None, "gpus": []}
    started = time.time()
    try:
        run(ADAPTERS[framework], report, claims, args, inv, probe)
    except ImportError as exc:
        report.add("import", False, f"cannot import {framework}: {exc}")
    if ok is not None:
        report.add("pip_check", ok, "pip check is clean" if ok else output.splitlines()[0] if output else "failed")
    result = {"schema": SCHEMA, "payload_version": payload_version(), "framework": framework, "claims": claims,
              "inventory": inv, "checks": report.checks, "seconds": round(time.time() - started, 2),
              "ok": all(c["status"] != "fail" for c in report.checks)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(tmp, args.out)
    print(f"smoke: {'ok' if result['ok'] else 'FAILED'}; result in {args.out}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
