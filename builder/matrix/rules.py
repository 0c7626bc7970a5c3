"""Compatibility rules. Each rule has a name and the fact behind it, and says where that fact lives.

check_references() checks the definitions themselves (run once at load); the per-combination rules
are applied by expand.py, which drops or refuses what they reject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from builder import tags
from builder.matrix.model import Matrix, dotted, printable

# cuDNN majors and the CUDA majors NVIDIA ships them for (cuDNN support matrix, docs.nvidia.com/deeplearning/cudnn).
CUDNN_CUDA_MAJORS = {"7": {"10", "11"}, "8": {"10", "11", "12"}, "9": {"11", "12", "13"}}
# The nvidia/cuda tag's cuDNN piece and the cuDNN major it means (NVIDIA's nvidia/cuda tag lists; docs/SOURCES.md).
CUDNN_TOKEN_MAJOR = {"cudnn8": "8", "cudnn9": "9", "cudnn": "9"}
# Minor-version compatibility floors per CUDA major (CUDA compatibility guide, "minor version compatibility").
DRIVER_FLOOR = {"11": "450", "12": "525", "13": "580"}


@dataclass(frozen=True)
class Violation:
    """A rule a combination breaks: the rule's name, the fact, and where the fact is written."""

    rule: str
    message: str
    where: str

    def __str__(self) -> str:
        return f"{self.message} [rule {self.rule}; fact at {self.where}]"


def _major(version: str) -> str:
    return version.split(".")[0]


def _version(text: str) -> Version | None:
    """`text` as a Version, or None where it is none (the schema's patterns should already have refused it)."""
    try:
        return Version(text)
    except (InvalidVersion, ValueError):
        return None


def check_references(matrix: Matrix) -> list[str]:
    """Every name that points elsewhere must exist, and the facts must agree with each other."""
    spec = matrix.spec
    problems: list[str] = []

    def bad(path: tuple[Any, ...], msg: str) -> None:
        problems.append(f"{matrix.where(path)}: {dotted(path)}: {msg}")

    # Names the registry will accept: the longest repository a framework gets, and every base image.
    longest = max(spec.frameworks, key=len, default="tensorflow")
    problem = tags.repository_problem(tags.cell_repository(spec.repository, longest))
    if problem:
        bad(("repository",), f"{problem} (with /{longest} added, as its images are named)")
    for name, base in spec.bases.items():
        if base.image:
            reference = base.image.split("@", 1)[0]
            repo, _, tag = reference.rpartition(":") if ":" in reference.rsplit("/", 1)[-1] else (reference, "", "")
            problem = tags.repository_problem(repo) or (tags.tag_problem(tag) if tag else None)
            if problem:
                bad(("bases", name, "image"), problem)

    for name, base in spec.bases.items():
        if base.nvidia_cuda is not None and not base.image:
            os_ok = [c for c, cs in spec.cuda.items() if base.nvidia_cuda.os in cs.image.os]
            if not os_ok:
                bad(("bases", name, "nvidia_cuda", "os"), f"no CUDA release in 'cuda' lists {base.nvidia_cuda.os}")
    for name, src in spec.python_sources.items():
        for i, b in enumerate(src.bases):
            if b not in spec.bases:
                bad(("python_sources", name, "bases", i), f"undefined base {b!r}")
    for line, cuda in spec.cuda.items():
        path = ("cuda", line)
        if not (cuda.image.tag == line or cuda.image.tag.startswith(line + ".")):
            bad((*path, "image", "tag"), f"nvidia/cuda tag {cuda.image.tag} is not a CUDA {line} release")
        token_major = CUDNN_TOKEN_MAJOR.get(cuda.image.cudnn)
        if cuda.image.cudnn and token_major != _major(cuda.cudnn):
            bad((*path, "image", "cudnn"), f"tag piece {cuda.image.cudnn!r} means cuDNN {token_major}, "
                f"but this release says cuDNN {cuda.cudnn}")
        if _major(cuda.cudnn) not in CUDNN_CUDA_MAJORS or _major(line) not in CUDNN_CUDA_MAJORS[_major(cuda.cudnn)]:
            bad((*path, "cudnn"), f"rule cudnn-cuda: cuDNN {_major(cuda.cudnn)} has no build for CUDA {_major(line)}")
        have_floor, have_ga = _version(cuda.driver.floor), _version(cuda.driver.ga)
        for key, value in (("floor", have_floor), ("ga", have_ga)):
            if value is None:
                bad((*path, "driver", key), f"{printable(getattr(cuda.driver, key))} is not a driver version")
        if have_floor is None or have_ga is None:
            continue
        if have_floor > have_ga:
            bad((*path, "driver", "floor"), f"floor {cuda.driver.floor} is above the GA driver {cuda.driver.ga}")
        floor = DRIVER_FLOOR.get(_major(line))
        if floor and have_floor < Version(floor):
            bad((*path, "driver", "floor"), f"CUDA {_major(line)}.x needs a driver >= {floor} "
                "(minor-version compatibility)")
    for fw_name, fw in spec.frameworks.items():
        for version, fv in fw.versions.items():
            vpath = ("frameworks", fw_name, "versions", version)
            for line, build in fv.builds.items():
                bpath = (*vpath, "builds", line)
                if line != "cpu" and line not in spec.cuda:
                    bad((*bpath, "[key]"), f"undefined CUDA release {line!r} (define it under 'cuda')")
                if build.index != "pypi" and build.index not in spec.indexes:
                    bad((*bpath, "index"), f"undefined index {build.index!r} (define it under 'indexes')")
                if line == "cpu":
                    if build.cudnn is not None:
                        bad((*bpath, "cudnn"), "a cpu build has no cuDNN")
                    if build.cuda_source != "wheels":
                        bad((*bpath, "cuda_source"), "a cpu build has no CUDA source")
                    continue
                if build.cudnn is None:
                    bad(bpath, "a CUDA build must name its exact cuDNN")
                    continue
                supported = CUDNN_CUDA_MAJORS.get(_major(build.cudnn), set())
                if _major(line) not in supported:
                    bad((*bpath, "cudnn"), f"rule cudnn-cuda: cuDNN {_major(build.cudnn)} has no build for "
                        f"CUDA {_major(line)} (cuDNN support matrix)")
                if fw.cuda_extra is None and fw_name == "tensorflow" and build.cuda_source == "wheels":
                    bad(bpath, "tensorflow's CUDA wheels need 'cuda_extra' (e.g. and-cuda) on the framework")
            if "cpu" in fv.builds and fw.cpu_package is None and fw_name == "tensorflow":
                bad(vpath, "a tensorflow cpu build needs 'cpu_package' (e.g. tensorflow-cpu) on the framework")
    for gi, group in enumerate(spec.images):
        gpath = ("images", gi)
        for i, b in enumerate(group.bases):
            if b not in spec.bases:
                bad((*gpath, "bases", i), f"undefined base {b!r}")
        group_fw = spec.frameworks.get(group.framework)
        if group_fw is None:
            bad((*gpath, "framework"), f"undefined framework {group.framework!r} (define it under 'frameworks')")
            continue
        # Every place in the group that names versions, CUDA lines or bases: (path, versions, cudas, base).
        named: list[tuple[tuple[Any, ...], list[str], list[str], str | None]] = []
        if group.axes:
            named.append(((*gpath, "axes"), group.axes.version or [], group.axes.cuda or [], None))
        for kind in ("include", "exclude"):
            for i, combo in enumerate(group.include if kind == "include" else group.exclude):
                named.append(((*gpath, kind, i), [combo.version] if combo.version else [],
                              [combo.cuda] if combo.cuda else [], combo.base))
                if kind == "include":
                    for key in ("version", "cuda", "python"):
                        if getattr(combo, key) is None:
                            bad((*gpath, kind, i), f"an include must name {key}")
        for cpath, versions, cudas, base_name in named:
            for v in versions:
                if v not in group_fw.versions:
                    bad((*cpath, "version"), f"undefined {group.framework} version {v!r}")
            for c in cudas:
                if c != "cpu" and c not in spec.cuda:
                    bad((*cpath, "cuda"), f"undefined CUDA release {c!r}")
            if base_name is not None and base_name not in spec.bases:
                bad((*cpath, "base"), f"undefined base {base_name!r}")
    return problems
