"""What a host can do with GPUs: its NVIDIA driver, its GPUs, and the ways its engine hands GPUs out.

Pure functions of what `nvidia-smi` printed and what `docker info` said, so every case (no driver, a
failing nvidia-smi, a toolkit without a GPU, CDI on a new engine) is tested from recorded output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A driver version as NVIDIA prints it: 550.54.14, 535.104.05, 470.82.01 (ASCII digits only).
DRIVER = re.compile(r"[0-9]{2,4}(?:\.[0-9]{1,4}){1,3}", re.ASCII)
QUERY = ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
# What `docker start` says when no NVIDIA runtime, hook or CDI spec can serve a GPU request.
NO_DEVICE_DRIVER = "could not select device driver"


@dataclass(frozen=True, kw_only=True)
class DriverProbe:
    """The driver and GPUs one probe saw; `error` says why it saw none where it failed."""

    version: str | None
    gpus: tuple[str, ...]
    error: str | None
    source: str  # where it looked: "nvidia-smi on this machine", "nvidia-smi in a container on ...", ...

    @property
    def summary(self) -> str:
        if self.version is None:
            return f"no NVIDIA driver ({self.error or 'none found'}; {self.source})"
        return f"driver {self.version}, {len(self.gpus)} GPU(s){': ' + ', '.join(self.gpus) if self.gpus else ''}"


def parse_nvidia_smi(returncode: int, stdout: str, stderr: str, source: str) -> DriverProbe:
    """Read `nvidia-smi --query-gpu=driver_version,name --format=csv,noheader`.

    A non-zero exit ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    or a line that is not `VERSION, NAME` is an error, never a driver called "NVIDIA-SMI".
    """
    said = " ".join((stdout.strip() or stderr.strip()).split())[:200]
    if returncode != 0:
        return DriverProbe(version=None, gpus=(), error=f"nvidia-smi exited {returncode}: {said or 'no output'}",
                           source=source)
    versions, gpus = set(), []
    for line in stdout.strip().splitlines():
        version, _, name = (part.strip() for part in line.partition(","))
        if not DRIVER.fullmatch(version) or not name:
            return DriverProbe(version=None, gpus=(), error=f"nvidia-smi printed {line.strip()[:120]!r}, not "
                               "'driver_version, name'", source=source)
        versions.add(version)
        gpus.append(name)
    if not gpus:
        return DriverProbe(version=None, gpus=(), error="nvidia-smi listed no GPU", source=source)
    if len(versions) > 1:
        return DriverProbe(version=None, gpus=tuple(gpus), error=f"nvidia-smi gave several drivers: "
                           f"{sorted(versions)}", source=source)
    return DriverProbe(version=versions.pop(), gpus=tuple(gpus), error=None, source=source)


def parse_proc_version(text: str, source: str) -> DriverProbe:
    """/proc/driver/nvidia/version: the kernel module's version, when nvidia-smi is missing."""
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(" + DRIVER.pattern + r")\b", text)
    if match is None:
        return DriverProbe(version=None, gpus=(), error="no version in /proc/driver/nvidia/version", source=source)
    return DriverProbe(version=match[1], gpus=(), error="nvidia-smi is missing: the GPUs were not listed",
                       source=source)


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def probe_local(run: Runner = _run, which: Callable[[str], str | None] = shutil.which,
                proc: str = "/proc/driver/nvidia/version") -> DriverProbe:
    """The driver of the machine builder runs on (which is the engine's host only for a local engine)."""
    source = "nvidia-smi on this machine"
    if which("nvidia-smi"):
        try:
            done = run(QUERY)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return DriverProbe(version=None, gpus=(), error=f"nvidia-smi did not run: {exc}", source=source)
        return parse_nvidia_smi(done.returncode, done.stdout, done.stderr, source)
    try:
        with open(proc, encoding="utf-8", errors="replace") as fh:
            return parse_proc_version(fh.read(4096), proc)
    except OSError:
        return DriverProbe(version=None, gpus=(), error="no nvidia-smi and no NVIDIA kernel module",
                           source="this machine")


def gpu_paths(info: dict[str, Any]) -> set[str]:
    """The ways `docker info` shows that the engine can hand out NVIDIA GPUs: "runtime" and "cdi".

    The third way, the NVIDIA hook on dockerd's PATH (how `--gpus` works with the Container Toolkit
    and no registered runtime), does not show in `docker info`: only starting a container with a GPU
    request tells (Engine.gpu_probe).
    """
    paths = set()
    if "nvidia" in (info.get("Runtimes") or {}) or info.get("DefaultRuntime") == "nvidia":
        paths.add("runtime")
    for device in info.get("DiscoveredDevices") or []:  # Engine 28.2+: CDI devices the engine found
        if device.get("Source") == "cdi" and str(device.get("ID", "")).startswith("nvidia.com/gpu"):
            paths.add("cdi")
    return paths


def cdi_only(paths: set[str]) -> bool:
    """A GPU request must name CDI devices when CDI is the only way the engine has."""
    return paths == {"cdi"}
