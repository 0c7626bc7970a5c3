from __future__ import annotations

from pathlib import Path

import pytest

# A small valid matrix. Tests replace one piece of it and assert the exact `file:line: path: message`.
SMALL = """\
schema: 1
repository: example/ml
indexes:
  pytorch-cpu: https://download.pytorch.org/whl/cpu
bases:
  debian12:
    image: debian:bookworm-slim
    python: "3.11"
    bootstrap: {suite: bookworm, mirror: http://deb.debian.org/debian}
  debian11:
    image: debian:bullseye-slim
    python: "3.9"
  cuda-devel:
    nvidia_cuda: {flavor: devel, os: ubuntu22.04, cudnn: false}
    python: "3.10"
cuda:
  "12.1":
    cudnn: "8.9"
    driver: {ga: "530.30.02", floor: "525"}
    image: {tag: "12.1.1", cudnn: cudnn8, os: [ubuntu22.04]}
  "12.5":
    cudnn: "9.3"
    driver: {ga: "555.42.02", floor: "525"}
    image: {tag: "12.5.1", cudnn: cudnn, os: [ubuntu22.04]}
frameworks:
  torch:
    package: torch
    versions:
      "2.1.2":
        python: ["3.9", "3.10", "3.11"]
        builds:
          "12.1": {cudnn: "8.9.2.26"}
      "2.4.1":
        python: ["3.9", "3.10", "3.11", "3.12"]
        companions: {torchvision: "0.19.1"}
        builds:
          "12.1": {cudnn: "9.1.0.70"}
          cpu: {index: pytorch-cpu}
  tensorflow:
    package: tensorflow
    cpu_package: tensorflow-cpu
    cuda_extra: and-cuda
    versions:
      "2.18.0":
        python: ["3.9", "3.10", "3.11", "3.12"]
        builds:
          "12.5": {cudnn: "9.3.0.75"}
images:
  - framework: torch
    bases: [debian11, debian12, cuda-devel]
    axes:
      python: ["3.9", "3.11", "3.12"]
  - framework: torch
    bases: [cuda-devel]
    axes:
      version: ["2.4.1"]
      cuda: ["12.1"]
      flavor: [devel]
  - framework: tensorflow
    bases: [debian12]
    include:
      - {version: "2.18.0", cuda: "12.5", python: "3.11"}
"""


@pytest.fixture
def write_matrix(tmp_path: Path):
    def write(text: str = SMALL, name: str = "m.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
