"""The shape of `matrix.yaml`, as strict pydantic models.

Every string that a template may emit is held to a strict pattern here, so nothing in the matrix
can inject a Dockerfile instruction. Versions must be YAML strings: strict mode refuses the float
that an unquoted `3.10` becomes, and load.py turns that refusal into advice.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator, model_validator

# Each pattern has a human name, used in error messages (load.PATTERN_NAMES). Digits are ASCII [0-9], never
# \d (which also matches the Arabic-Indic and full-width digits), and a number has at most 9 of them, so every
# version stays a version that packaging.Version and int() can read.
N = "[0-9]{1,9}"
MAJOR_MINOR = rf"^{N}\.{N}$"
VERSION = rf"^{N}(\.{N}){{0,3}}$"
NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
IMAGE_REF = (
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
REPOSITORY = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*$"
URL = r"^https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(/[A-Za-z0-9._~%+/-]{0,2000})?$"
SUITE = r"^[a-z]{1,32}$"
OS_TAG = rf"^(ubuntu|ubi|rockylinux|debian){N}(\.{N})?$"
CUDNN_TOKEN = r"^(cudnn[0-9]{0,3})?$"
CUDA_LINE = rf"^({N}\.{N}|cpu)$"
REQUIREMENT = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}(\[[a-z0-9,_-]{{1,99}}\])?=={N}(\.{N}){{0,3}}(\.post{N})?$"
# One line of printable text: no control characters (ANSI escapes), and no Unicode line or paragraph breaks.
NOTE = r"^[^\x00-\x1f\x7f\x{85}\x{2028}\x{2029}]*$"
SHA256 = r"^[a-f0-9]{64}$"
# A model's file name in its URL (the last path segment): what torch.hub caches it as, so no '/' and no '..'.
MODEL_URL = (r"^https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?/([A-Za-z0-9._~%+-]{1,200}/){0,20}"
             r"[A-Za-z0-9_~%+-][A-Za-z0-9._~%+-]{0,200}$")

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
Note = Annotated[str, StringConstraints(max_length=300, pattern=NOTE)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256)]
ModelUrl = Annotated[str, StringConstraints(pattern=MODEL_URL)]

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
        if self.bootstrap is not None and self.image is not None and "@" in self.image:
            # A bootstrapped image has no registry digest, so the pin could never hold for it.
            raise ValueError("a digest-pinned image cannot be bootstrapped (a bootstrapped base has no registry "
                             "digest): drop the @sha256 pin or the bootstrap")
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
    # The `cuda-toolkit` version the framework's wheels pin (CUDA 13 on): a devel cell takes its compiler from
    # that release's wheels (nvcc, crt, nvvm, cccl) on a plain OS base, instead of an nvidia/cuda devel image.
    toolkit: Version | None = None
    unverified: list[Literal["cudnn", "pins", "index", "toolkit"]] = []
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
    models: list[ModelSpec] = []

    @model_validator(mode="after")
    def _something(self) -> ImageGroup:
        if self.axes is None and not self.include:
            raise ValueError("give 'axes', 'include', or both")
        for i, model in enumerate(self.models):
            for j, other in enumerate(self.models[:i]):
                if model.name == other.name or model.url == other.url:
                    same = "name" if model.name == other.name else "url"
                    raise ValueError(f"models[{i}] has the same {same} as models[{j}]; list each model once")
        return self


# torchvision's weight files are named `<name>-<first hex digits of their sha256>.pth`.
TORCH_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]{1,8}$")


class ModelSpec(Strict):
    """A pretrained model baked into a group's images: fetched once, verified by `sha256`, loaded offline.

    `torch`: a weights file loaded with torch.hub.load_state_dict_from_url into the torchvision architecture
    `arch`. `tfhub`: a TF Hub module URL in the compressed format, loaded with tensorflow_hub.load.
    `input`: the shape of the fixed float32 input certify runs one forward pass on.
    """

    name: Name
    hub: Literal["torch", "tfhub"]
    url: ModelUrl
    sha256: Sha256
    arch: Name | None = None
    input: list[Annotated[StrictInt, Field(ge=1, le=4096)]] = Field(min_length=1, max_length=6)

    @model_validator(mode="after")
    def _fits_hub(self) -> ModelSpec:
        if self.hub == "torch" and self.arch is None:
            raise ValueError("a torch model needs 'arch': the torchvision architecture its weights fit "
                             "(e.g. resnet18), which certify builds to run the forward pass")
        if self.hub == "tfhub" and self.arch is not None:
            raise ValueError("'arch' is for torch models; a TF Hub module carries its own graph")
        prefix = TORCH_HASH_PREFIX.search(self.url) if self.hub == "torch" else None
        if prefix and not self.sha256.startswith(prefix[1]):
            raise ValueError(f"the file name says its sha256 starts with {prefix[1]}, the pin is "
                             f"{self.sha256[:len(prefix[1])]}...: one of them is wrong")
        return self


class AliasWhere(Strict):
    """Which cells an alias chooses among (all given must match)."""

    cuda: CudaLine | None = None
    python: MajorMinor | None = None
    flavor: Flavor | None = None
    base: Name | None = None


class Alias(Strict):
    """A tag that moves to the newest `framework` version among the matching cells, once per distinct value
    of its placeholders: `latest-cuda{cuda}` is the newest torch for each CUDA line (builder.matrix.aliases)."""

    tag: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    framework: FrameworkName
    where: AliasWhere = AliasWhere()


class MatrixFile(Strict):
    schema_: StrictInt = Field(alias="schema")
    repository: Repository = "builder"
    registry: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None  # host[:port][/ns]
    aliases: list[Alias] = []
    indexes: dict[Name, Url] = {}
    # What installs a cell's packages: an exact uv pin (uv==X.Y.Z), which also makes proxied builds direct, else pip.
    installer: Requirement | None = None
    bases: dict[Name, BaseSpec] = Field(min_length=1)
    python_sources: dict[Name, PythonSource] = {}
    cuda: dict[MajorMinor, CudaSpec] = Field(min_length=1)
    frameworks: dict[FrameworkName, FrameworkSpec] = Field(min_length=1)
    images: list[ImageGroup] = Field(min_length=1)

    @field_validator("installer")
    @classmethod
    def _installer_is_uv(cls, value: str | None) -> str | None:
        # pip is the default and needs no pin (it comes with the venv); uv is the only other installer known.
        if value is not None and value.split("==")[0].lower() != "uv":
            raise ValueError("the installer must be uv, pinned exactly (uv==0.13.8), or left out for pip")
        return value

    @field_validator("schema_")
    @classmethod
    def _schema_one(cls, value: int) -> int:
        # StrictInt, not Literal[1]: a Literal lets `true` and `1.0` through as equal to 1.
        if value != 1:
            raise ValueError("Input should be 1")
        return value
