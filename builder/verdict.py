"""The verdict: which level a payload's result earns. Standard library only, so the GPU evidence script
(docs/gpu-proof.sh) applies the very same rule on a GPU host that has no Docker and none of builder's
dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What gpu-certified means: each of these passed in a run that was given GPUs ...
REQUIRED_GPU_CHECKS = ("gpu.visible", "gpu.cudnn_conv", "gpu.matches_cpu", "gpu.train_mixed_precision",
                       "gpu.matmul", "gpu.no_cpu_fallback")
# ... and, with two or more GPUs, the collective too.
MULTI_GPU_CHECKS = ("gpu.all_reduce",)
# Lines a framework logs when it was given GPUs and could not use them: kept as the cause of the failure.
GPU_REFUSALS = ("Skipping registering GPU devices", "Cannot dlopen some GPU libraries", "CUDA driver version is "
                "insufficient", "cuInit", "Found no NVIDIA driver", "no CUDA-capable device")


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one certification decided, before it is written down."""

    level: str
    reasons: list[str]
    gpu_note: str | None


def _check(checks: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in checks if c.get("name") == name), None)


def decide(result: dict[str, Any] | None, exit_code: int | None, *, requested: bool, require_gpu: bool,
           logs: str = "") -> Outcome:
    """The level an image earns from its payload's result.

    gpu-certified needs every check in REQUIRED_GPU_CHECKS to pass (and the collective with two or
    more GPUs) in a run that was given GPUs. A run given GPUs that does not get there fails, naming
    the cause: cpu-verified is only for runs where no GPU was asked for.
    """
    if result is None:
        why = "the payload timed out" if exit_code is None else f"the payload wrote no result (exit {exit_code})"
        return Outcome(level="failed", reasons=[why], gpu_note=None)
    checks = [c for c in result.get("checks") or [] if isinstance(c, dict)]
    failed = [f"{c.get('name')}: {c.get('detail')}" for c in checks if c.get("status") == "fail"]
    if exit_code not in (0, None) and not failed:
        failed.append(f"the payload exited with {exit_code}")
    if exit_code is None:
        failed.append("the payload timed out")
    if requested:
        gpus = (result.get("inventory") or {}).get("gpus") or []
        needed = REQUIRED_GPU_CHECKS + (MULTI_GPU_CHECKS if len(gpus) >= 2 else ())
        for name in needed:
            check = _check(checks, name)
            if check is None:
                failed.append(f"{name}: GPUs were requested but this check never ran")
            elif check.get("status") == "skip":
                failed.append(f"{name}: GPUs were requested but it was skipped ({check.get('detail')})")
        refusals = sorted({line.strip()[-200:] for line in logs.splitlines() if any(r in line for r in GPU_REFUSALS)})
        if failed and refusals:
            failed.append("the framework said: " + " | ".join(refusals[:3]))
    level = "failed" if failed else "gpu-certified" if requested else "cpu-verified"
    note = None
    if require_gpu and level == "cpu-verified":
        note = "--require-gpu: no GPU was given to the container"
    return Outcome(level=level, reasons=failed, gpu_note=note)


REASON_MAX = 80  # a skip's reason in a summary line; the whole detail is in the certificate and the --debug log


def reason(detail: str, limit: int = REASON_MAX) -> str:
    """A skip's reason for a summary: its words before the first colon, whole, or cut at a word boundary."""
    head = detail.split(":")[0].strip()
    if len(head) <= limit:
        return head
    return head[:limit + 1].rsplit(" ", 1)[0].rstrip(",;") + " ..."


def summarize(checks: list[dict[str, Any]]) -> str:
    """`9 passed, 1 skipped (no GPU)`: counts by status, with the reasons for skips."""
    counts = {s: sum(c.get("status") == s for c in checks) for s in ("pass", "fail", "skip")}
    text = f"{counts['pass']} passed"
    if counts["fail"]:
        text += f", {counts['fail']} failed"
    if counts["skip"]:
        why = sorted({reason(str(c.get("detail", ""))) for c in checks if c.get("status") == "skip"})
        text += f", {counts['skip']} skipped ({'; '.join(why)})"
    return text
