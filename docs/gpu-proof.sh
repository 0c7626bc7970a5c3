#!/usr/bin/env bash
# The GPU half of certification, on a GPU host that has its own torch and no Docker (the device machine):
#
#   bash docs/gpu-proof.sh [OUT]        # writes OUT/gpu-proof.json (default OUT: docs)
#
# It exits 0 only when both hold, judged by builder's own verdict (builder/verdict.py, standard library):
#   1. the payload, given the GPU, earns gpu-certified against the claims of the matrix cell that matches
#      this host's torch, CUDA and Python;
#   2. the negative control, the same payload with the GPU hidden (CUDA_VISIBLE_DEVICES=""), passes no
#      gpu.* check and fails, naming why.
# The whole run is bounded (PROOF_BUDGET_S, default 230 s) to fit a 15-minute device lease with its start-up.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
py=${PYTHON:-python3}
budget=${PROOF_BUDGET_S:-230}
mkdir -p "$out"
exec "$py" - "$out" "$budget" <<'PY'
import json, os, platform, subprocess, sys, time

sys.path.insert(0, os.getcwd())
from builder.verdict import decide, summarize  # noqa: E402  (standard library only)

out, budget = sys.argv[1], float(sys.argv[2])
started = time.monotonic()
report = {"host": {}, "runs": {}, "verdict": "failed", "problems": []}


def left():
    return max(5.0, budget - (time.monotonic() - started))


def smi():
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return {"exit": done.returncode, "output": (done.stdout or done.stderr).strip()}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"exit": None, "output": str(exc)}


def finish():
    report["seconds"] = round(time.monotonic() - started, 1)
    path = os.path.join(out, "gpu-proof.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2, sort_keys=True, default=str)
    for name, run in report["runs"].items():
        print(f"== {name}: {run.get('level')} ({run.get('summary')})")
        for c in run.get("checks", []):
            print(f"   {c['status']:4} {c['name']}: {c['detail'][:150]}")
    for p in report["problems"]:
        print(f"problem: {p}")
    print(f"gpu-proof: {report['verdict'].upper()} in {report['seconds']} s; evidence in {path}")
    sys.exit(0 if report["verdict"] == "passed" else 1)


report["host"]["nvidia_smi"] = smi()
try:
    probe = subprocess.run([sys.executable, "-c", "import json, platform, torch; print(json.dumps({'torch': "
                            "torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version(), "
                            "'gpus': torch.cuda.device_count()}))"], capture_output=True, text=True, timeout=120)
    host = json.loads(probe.stdout)
except Exception as exc:  # no torch, or one that cannot start: nothing to prove
    report["problems"].append(f"cannot read this host's torch: {exc}")
    finish()
report["host"].update(host)

# The matrix cell for this host: from builder itself where its dependencies are installed, else from the
# committed list of the matrix's torch cells (tests/unit check that it matches matrix.yaml).
version, cuda = host["torch"].split("+")[0], host["cuda"]
pyver = ".".join(host["python"].split(".")[:2])
cells = None
listing = subprocess.run([sys.executable, "-m", "builder", "matrix", "--framework", "torch", "--format", "json"],
                         capture_output=True, text=True, timeout=120)
if os.environ.get("PROOF_CELLS"):  # the tests' own list
    with open(os.environ["PROOF_CELLS"]) as fh:
        cells = json.load(fh)
    report["host"]["cells_from"] = os.environ["PROOF_CELLS"]
elif listing.returncode == 0:
    cells = [row["claims"] for row in json.loads(listing.stdout)]
    report["host"]["cells_from"] = "python -m builder matrix"
else:
    with open("docs/gpu-proof-cells.json") as fh:
        cells = json.load(fh)
    report["host"]["cells_from"] = "docs/gpu-proof-cells.json"
match = [c for c in cells if c["version"] == version and c["cuda"] == cuda and c["python"] == pyver
         and c["flavor"] == "runtime"]
if not match:
    report["problems"].append(f"no runtime cell of the matrix is torch {version} / CUDA {cuda} / Python {pyver}: "
                              "this host cannot vouch for any cell")
    finish()
claims = match[0]
report["cell"] = claims["tag"]
claims_path = os.path.join(out, "gpu-proof-claims.json")
with open(claims_path, "w") as fh:
    json.dump(claims, fh)


def run(name, hidden, steps, timeout):
    result_path = os.path.join(out, f"gpu-proof-{name}.result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if hidden:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "builder/smoke/payload.py", "--claims", claims_path, "--out", result_path,
           "--gpu", "require", "--steps", str(steps), "--compile", "off"]  # torch.compile alone can take minutes
    if not hidden and host.get("gpus"):
        cmd += ["--expect-gpus", str(host["gpus"])]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, logs = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, logs = None, str(exc)
    try:
        with open(result_path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        result = None
    outcome = decide(result, code, requested=True, require_gpu=True, logs=logs)
    checks = (result or {}).get("checks", [])
    report["runs"][name] = {"level": outcome.level, "reasons": outcome.reasons, "exit_code": code,
                            "seconds": round(time.monotonic() - t0, 1), "summary": summarize(checks),
                            "checks": checks, "inventory": (result or {}).get("inventory"),
                            "log_tail": logs.splitlines()[-15:]}
    return outcome, checks


control, control_checks = run("gpu-hidden", True, min(40, int(os.environ.get("PROOF_STEPS", "40"))),
                              min(90.0, left() / 3))
proof, _ = run("gpu", False, int(os.environ.get("PROOF_STEPS", "200")), left())
gpu_passes = [c["name"] for c in control_checks if c["name"].startswith("gpu.") and c["status"] == "pass"]
if proof.level != "gpu-certified":
    report["problems"].append("with the GPU: " + ("; ".join(proof.reasons[:5]) or proof.level))
if control.level != "failed" or gpu_passes:
    report["problems"].append(f"negative control (GPU hidden) gave {control.level} with GPU checks passing: "
                              f"{gpu_passes}: a check that passes without a GPU proves nothing")
if time.monotonic() - started > budget:
    report["problems"].append(f"took longer than the {budget:.0f} s budget")
report["verdict"] = "passed" if not report["problems"] else "failed"
finish()
PY
