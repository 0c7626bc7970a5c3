"""The payload's devel checks: each verdict fed its failure (a wrong toolkit, a broken nvcc, no compiler)."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from builder.smoke import payload

NVCC_13 = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"

# A stand-in nvcc: writes what a real one would for -cubin/-ptx/-fatbin, or a broken cubin when BROKEN is set.
FAKE_NVCC = """#!/bin/sh
out=""; kind=""
while [ $# -gt 0 ]; do
  case "$1" in -o) out="$2"; shift;; -cubin) kind=cubin;; -ptx) kind=ptx;; -fatbin) kind=fatbin;; esac; shift
done
case "$kind" in
  cubin) if [ -n "$BROKEN" ]; then printf 'not elf' > "$out"; else printf '\\177ELFcubin' > "$out"; fi;;
  ptx) printf '.version 9.0\\n.target sm_90\\n.visible .entry axpy(\\n' > "$out";;
  fatbin) head -c 4096 /dev/zero > "$out";;
esac
"""


def test_toolkit_version_must_equal_the_frameworks():
    report = payload.Report()
    assert payload.toolkit_verdict(report, NVCC_13, "13.0")
    assert not payload.toolkit_verdict(report, NVCC_13.replace("13.0", "12.8"), "13.0")
    assert not payload.toolkit_verdict(report, "command not found", "13.0")
    assert [c["status"] for c in report.checks] == ["pass", "fail", "fail"]
    assert "nvcc 12.8, torch built with CUDA 13.0: they differ" in report.checks[1]["detail"]


@pytest.fixture
def nvcc(tmp_path: Path) -> str:
    path = tmp_path / "nvcc"
    path.write_text(FAKE_NVCC)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_nvcc_check_passes_on_cubin_ptx_and_fatbin(nvcc, tmp_path):
    report = payload.Report()
    work = tmp_path / "work"
    work.mkdir()
    assert payload.nvcc_check(report, nvcc, ["sm_80", "sm_90"], str(work))
    values = report.checks[0]["values"]
    assert values["arches"] == ["sm_80", "sm_90"] and values["gpu_run"] == payload.GPU_RUN_UNVERIFIED


def test_nvcc_check_fails_on_a_cubin_that_is_no_elf(nvcc, tmp_path, monkeypatch):
    monkeypatch.setenv("BROKEN", "1")
    report = payload.Report()
    assert not payload.nvcc_check(report, nvcc, ["sm_90"], str(tmp_path))
    assert report.checks[0]["status"] == "fail" and "no ELF" in report.checks[0]["detail"]


def test_nvcc_failure_is_a_failed_check_naming_the_error(tmp_path):
    broken = tmp_path / "nvcc"
    broken.write_text("#!/bin/sh\necho 'nvcc fatal   : Unsupported gpu architecture' >&2\nexit 1\n")
    broken.chmod(0o755)
    report = payload.Report()
    report.guard("devel.nvcc", lambda: payload.nvcc_check(report, str(broken), ["sm_90"], str(tmp_path)))
    got = report.checks[0]
    assert got["status"] == "fail" and "Unsupported gpu architecture" in got["detail"]


def test_devel_claims_run_the_adapters_devel_checks_and_require_compile(monkeypatch):
    monkeypatch.setattr(payload, "check_claims", lambda *a: None)  # only the flavor matters here
    class Fake(payload.Adapter):
        name = "fake"

        def load(self):
            return None

        def inventory(self):
            return {}

        def train_cpu(self, report, args, inv):
            pass

        def compile_check(self, report, args, inv):
            report.add("compile.fake", not args.devel, "devel" if args.devel else "runtime")

    report = payload.Report()
    args = argparse.Namespace(compile="off", gpu="off")
    payload.run(Fake(), report, {"flavor": "devel"}, args, {}, {})
    names = {c["name"]: c["status"] for c in report.checks}
    # --compile off does not switch compile off in a devel image; the base adapter has no devel checks: a failure.
    assert names["compile.fake"] == "fail" and names["devel"] == "fail"
    report = payload.Report()
    payload.run(Fake(), report, {"flavor": "runtime"}, argparse.Namespace(compile="off", gpu="off"), {}, {})
    assert "devel" not in {c["name"] for c in report.checks}


def test_no_compiler_in_a_devel_image_fails_compile(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    adapter = payload.TorchAdapter()
    adapter.load()
    report = payload.Report()
    adapter.compile_check(report, argparse.Namespace(gpu="auto", devel=True), {})
    got = report.checks[0]
    assert (got["name"], got["status"]) == ("compile.torch", "fail") and "devel image" in got["detail"]


def test_a_failed_build_keeps_the_last_lines_of_its_output():
    # load_inline raises ninja's whole output in one message; its first line is only the nvcc command.
    ninja = ["Error building extension 'builder_devel_axpy': [1/3] /opt/cuda/bin/nvcc -c cuda.cu -o cuda.cuda.o"]
    ninja += [f"noise {i}" for i in range(30)]
    ninja += ["cuda.cu:1:10: fatal error: cuda_runtime.h: No such file or directory", "ninja: build stopped"]
    report = payload.Report()

    def build():
        raise RuntimeError("\n".join(ninja))

    assert report.guard("devel.cpp_extension", build) is None
    got = report.checks[0]
    tail = got["values"]["error_tail"]
    assert got["status"] == "fail" and len(tail) == payload.ERROR_TAIL_LINES
    assert tail[-2:] == ninja[-2:] and "ninja: build stopped" in got["detail"]
    assert "cuda_runtime.h: No such file" in "\n".join(tail)


def test_nvcc_failure_keeps_the_cause_after_the_first_line(tmp_path):
    broken = tmp_path / "nvcc"
    broken.write_text("#!/bin/sh\necho 'In file included from axpy.cu:1:' >&2\n"
                      "echo 'crt/host_config.h: No such file or directory' >&2\nexit 1\n")
    broken.chmod(0o755)
    report = payload.Report()
    report.guard("devel.nvcc", lambda: payload.nvcc_check(report, str(broken), ["sm_90"], str(tmp_path)))
    got = report.checks[0]
    assert got["status"] == "fail" and "host_config.h" in got["values"]["error_tail"][-1]
