"""Reading the frameworks' own metadata: wheel lists to Python ranges, METADATA to the cuDNN pin."""

from __future__ import annotations

from builder.facts import Fact, cudnn_pin, linux_wheels, python_range

TORCH_META = """Metadata-Version: 2.1
Name: torch
Version: 2.4.1
Requires-Dist: filelock
Requires-Dist: nvidia-cuda-runtime-cu12 (==12.1.105) ; platform_system == "Linux" and platform_machine == "x86_64"
Requires-Dist: nvidia-cudnn-cu12 (==9.1.0.70) ; platform_system == "Linux" and platform_machine == "x86_64"
Requires-Dist: opt-einsum (>=3.3) ; extra == 'opt-einsum'
"""

TF_META = """Metadata-Version: 2.1
Name: tensorflow
Version: 2.20.0
Requires-Dist: nvidia-cudnn-cu12<10.0,>=9.3.0.75; extra == "and-cuda"
Requires-Dist: nvidia-cudnn-cu11==8.6.0.163; extra == "other-cuda"
"""


def test_cudnn_pin_from_torch_metadata():
    assert cudnn_pin(TORCH_META) == "9.1.0.70"


def test_cudnn_range_from_tf_and_cuda_extra_only():
    assert cudnn_pin(TF_META) == "<10.0,>=9.3.0.75"


def test_no_cudnn_requirement():
    assert cudnn_pin("Name: x\nRequires-Dist: numpy\n") is None


def test_python_range_from_the_wheels_that_exist():
    files = [{"filename": f"torch-2.5.1-{cp}-{cp}-manylinux1_x86_64.whl"} for cp in ("cp39", "cp313", "cp310")]
    files += [{"filename": "torch-2.5.1-cp312-cp312-manylinux_2_17_aarch64.whl"},
              {"filename": "torch-2.5.1-cp38-cp38-win_amd64.whl"},
              {"filename": "torch-2.5.0-cp311-cp311-manylinux1_x86_64.whl"},
              {"filename": "torch-2.5.1.tar.gz"}]
    wheels = linux_wheels(files, "torch", "2.5.1")
    assert python_range(wheels) == ["3.9", "3.10", "3.13"]


def test_verdicts():
    def fact(matrix: str, index: str) -> Fact:
        return Fact(framework="t", version="1", line="12.1", fact="cudnn", matrix=matrix, index=index, where="m:1")

    assert fact("9.1.0.70", "9.1.0.70").verdict == "ok"
    assert fact("9.1.0.70", "9.3.0.75").verdict == "differs"
    assert fact("9.3.0.75", "<10.0,>=9.3.0.75").verdict == "ok"
    assert fact("9.2.0.1", "<10.0,>=9.3.0.75").verdict == "differs"
    assert fact("9.1.0.70", "unavailable").verdict == "unavailable"
