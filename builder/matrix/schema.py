"""The shape of `matrix.yaml`, as strict pydantic models.

Every string that a template may emit is held to a strict pattern here, so nothing in the matrix
can inject a Dockerfile instruction. Versions must be YAML strings: strict mode refuses the float
that an unquoted `3.10` becomes, and load.py turns that refusal into advice.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# Each pattern has a human name, used in error messages (load.PATTERN_NAMES).
MAJOR_MINOR = r"^\d+\.\d+$"
VERSION = r"^\d+(\.\d+){0,3}$"
NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
IMAGE_REF = (
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
REPOSITORY = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$"
URL = r"^https?://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~%+/-]*)?$"
SUITE = r"^[a-z]+$"
OS_TAG = r"^(ubuntu|ubi|rockylinux|debian)\d+(\.\d+)?$"
CUDNN_TOKEN = r"^(cudnn\d*)?$"
CUDA_LINE = r"^(\d+\.\d+|cpu)$"
REQUIREMENT = r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[a-z0-9,_-]+\])?==\d+(\.\d+){0,3}(\.post\d+)?$"

MajorMinor = Annotated[str, StringConstraints(pattern=MAJOR_MINOR)]
Version = Annotated[str, StringConstraints(pattern=VERSION)]
Name = Annotated[str, StringConstraints(pattern=NAME)]
ImageRef = Annotated[str, StringConstraints(pattern=IMAGE_REF)]
Repository = Annotated[str, StringConstraints(pattern=REPOSITORY)]
Url = Annotated[str, StringConstraints(pattern=URL)]
Suite = Annotated[str, StringConstraints(pattern=SUITE)]
OsTag = Annotated[str, StringConstraints(pattern=OS_TAG)]
CudnnToken = Annotated[str, StringConstraints(pattern=CUDNN_TOKEN)]
CudaLine = Annotated[str, StringConstraints(pattern=CUDA_LINE)]
Requirement = Annotated[str, StringConstraints(pattern=REQUIREMENT)]
Note = Annotated[str, StringConstraints(max_length=300, pattern=r"^[^\n\r]*$")]

Flavor = Literal["runtime", "devel"]
FrameworkName = Literal["torch", "tensorflow"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Bootstrap(Strict):
    """How to make the base offline: debootstrap SUITE from MIRROR, then import it."""

    suite: Suite
    mirror: Url


class NvidiaCudaBase(Strict):
    """An nvidia/cuda image; its tag is built from the cell's CUDA release and these pieces."""

    flavor: Flavor
    os: OsTag
    cudnn: bool = True


class BaseSpec(Strict):
    image: ImageRef | None = None
    nvidia_cuda: NvidiaCudaBase | None = None
    python: MajorMinor
    bootstrap: Bootstrap | None = None

    @model_validator(mode="after")
    def _one_image(self) -> BaseSpec:
        if (self.image is None) == (self.nvidia_cuda is None):
            raise ValueError("give exactly one of 'image' or 'nvidia_cuda'")
        if self.nvidia_cuda is not None and self.bootstrap is not None:
            raise ValueError("an nvidia_cuda base cannot be bootstrapped with debootstrap")
        return self


class PythonSource(Strict):
    """Another way to get a Python onto a base than its system package (e.g. the deadsnakes PPA)."""

    kind: Literal["deadsnakes"]
    bases: list[Name] = Field(min_length=1)
    python: list[MajorMinor] = Field(min_length=1)


class Driver(Strict):
    ga: Version
    floor: Version


class CudaImageTag(Strict):
    tag: Version
    cudnn: CudnnToken
    os: list[OsTag] = Field(min_length=1)


class CudaSpec(Strict):
    cudnn: MajorMinor
    driver: Driver
    image: CudaImageTag
    unverified: list[Literal["cudnn", "driver", "image"]] = []


class BuildLine(Strict):
    cudnn: Version | None = None
    index: Name = "pypi"
    cuda_source: Literal["wheels", "system"] = "wheels"
    pins: list[Requirement] = []
    unverified: list[Literal["cudnn", "pins", "index"]] = []
    note: Note | None = None


class FrameworkVersion(Strict):
    python: list[MajorMinor] = Field(min_length=1)
    builds: dict[CudaLine, BuildLine] = Field(min_length=1)
    companions: dict[Name, Version] = {}
    unverified: list[Literal["python", "companions"]] = []
    note: Note | None = None


class FrameworkSpec(Strict):
    package: Name
    cpu_package: Name | None = None
    cuda_extra: Name | None = None
    versions: dict[Version, FrameworkVersion] = Field(min_length=1)


class Axes(Strict):
    version: list[Version] | None = Field(default=None, min_length=1)
    cuda: list[CudaLine] | None = Field(default=None, min_length=1)
    python: list[MajorMinor] | None = Field(default=None, min_length=1)
    flavor: list[Flavor] = Field(default=["runtime"], min_length=1)


class Combo(Strict):
    """One combination, as named by an include (all of version, cuda, python) or an exclude (any)."""

    version: Version | None = None
    cuda: CudaLine | None = None
    python: MajorMinor | None = None
    flavor: Flavor | None = None
    base: Name | None = None


class ImageGroup(Strict):
    framework: FrameworkName
    bases: list[Name] = Field(min_length=1)
    axes: Axes | None = None
    include: list[Combo] = []
    exclude: list[Combo] = []

    @model_validator(mode="after")
    def _something(self) -> ImageGroup:
        if self.axes is None and not self.include:
            raise ValueError("give 'axes', 'include', or both")
        return self


class MatrixFile(Strict):
    schema_: Literal[1] = Field(alias="schema")
    repository: Repository = "builder"
    indexes: dict[Name, Url] = {}
    bases: dict[Name, BaseSpec] = Field(min_length=1)
    python_sources: dict[Name, PythonSource] = {}
    cuda: dict[MajorMinor, CudaSpec] = Field(min_length=1)
    frameworks: dict[FrameworkName, FrameworkSpec] = Field(min_length=1)
    images: list[ImageGroup] = Field(min_length=1)
