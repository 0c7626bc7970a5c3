#!/usr/bin/env bash
# The GPU half of the smoke test, run directly with a GPU host's own framework (no Docker needed).
# For the device machine: `bash docs/gpu-proof.sh "$OUT"`; the JSON it writes is committed under docs/.
set -euo pipefail
out=${1:-docs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
PYTHONUNBUFFERED=1 python3 builder/smoke/payload.py --framework torch --steps 200 --out "$out/gpu-proof-torch.json"
python3 - "$out/gpu-proof-torch.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for c in r["checks"]:
    print(f"{c['status']:5} {c['name']}: {c['detail']}")
inv = r["inventory"]
print("matmul:", inv.get("matmul_tflops"), "steps/s:", inv.get("gpu_train_steps_per_second"))
PY
