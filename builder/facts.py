"""Check the matrix's framework facts against the packages' own metadata on the index.

For each framework version built from the default index, the JSON simple index (PEP 691) lists the
wheels that exist, which gives the Python range, and the wheel's METADATA (PEP 658, a few KB) gives the
exact cuDNN pin. Uploads without a `.metadata` file (TF up to 2.18, some torch wheels) are reported as
unavailable, not guessed.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.parser import Parser

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from builder.matrix.model import Matrix
from builder.sources import Sources

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
CUDNN = re.compile(r"^nvidia-cudnn-cu\d+$")


@dataclass(frozen=True, kw_only=True)
class Fact:
    framework: str
    version: str
    line: str
    fact: str
    matrix: str
    index: str
    where: str

    @property
    def verdict(self) -> str:
        if self.index == "unavailable":
            return "unavailable"
        if self.index[:1] in "<>=!~" and self.matrix[:1].isdigit():
            # The index gives a range (TF 2.20): the matrix's exact pin must fall inside it.
            return "ok" if SpecifierSet(self.index).contains(self.matrix) else "differs"
        return "ok" if self.matrix == self.index else "differs"


def linux_wheels(files: list[dict[str, object]], package: str, version: str) -> dict[str, dict[str, object]]:
    """cpXY -> the file entry of its manylinux x86_64 wheel of `version`."""
    found: dict[str, dict[str, object]] = {}
    for entry in files:
        name = str(entry.get("filename", ""))
        if not name.endswith(".whl"):
            continue
        try:
            dist, ver, _, tags = parse_wheel_filename(name)
        except InvalidWheelFilename:
            continue
        if dist != canonicalize_name(package) or str(ver).split("+")[0] != version:
            continue
        for tag in tags:
            if tag.interpreter.startswith("cp") and "x86_64" in tag.platform and "linux" in tag.platform:
                found.setdefault(tag.interpreter, entry)
    return found


def python_range(wheels: dict[str, dict[str, object]]) -> list[str]:
    versions = [f"{cp[2]}.{cp[3:]}" for cp in wheels if len(cp) >= 4]
    return sorted(versions, key=Version)


def cudnn_pin(metadata: str) -> str | None:
    """The exact nvidia-cudnn-cu* version a wheel's METADATA requires, ignoring extras."""
    for value in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        try:
            req = Requirement(value)
        except InvalidRequirement:
            continue
        if req.marker is not None and "extra" in str(req.marker) and "and-cuda" not in str(req.marker):
            continue
        if CUDNN.match(req.name):
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if pins:
                return pins[0]
            return str(req.specifier) or None
    return None


class Index:
    def __init__(self, sources: Sources) -> None:
        self.base = sources.index_url
        self.context = sources.ssl_context()

    def _get(self, url: str, accept: str) -> bytes:
        req = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "builder-facts"})
        with urllib.request.urlopen(req, timeout=60, context=self.context) as resp:
            return bytes(resp.read())

    def files(self, package: str) -> list[dict[str, object]]:
        data = json.loads(self._get(f"{self.base}/{canonicalize_name(package)}/", SIMPLE_JSON))
        return list(data.get("files", []))

    def metadata(self, entry: dict[str, object]) -> str | None:
        """The wheel's METADATA (PEP 658). Tried even when the index does not advertise it: PyPI often has it."""
        try:
            return self._get(str(entry["url"]) + ".metadata", "*/*").decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def check(matrix: Matrix, index: Index, frameworks: set[str] | None = None) -> list[Fact]:
    """Compare each default-index build's Python range and cuDNN pin with the index's metadata."""
    facts: list[Fact] = []
    for fw_name, fw in matrix.spec.frameworks.items():
        if frameworks and fw_name not in frameworks:
            continue
        package_files = index.files(fw.package)
        for version, fv in fw.versions.items():
            wheels = linux_wheels(package_files, fw.package, version)
            vpath = ("frameworks", fw_name, "versions", version)
            where = matrix.where((*vpath, "python"))
            have = python_range(wheels) or ["unavailable"]
            claimed = sorted(fv.python, key=Version)
            facts.append(Fact(framework=fw_name, version=version, line="*", fact="python", where=where,
                              matrix=", ".join(claimed), index=", ".join(have)))
            for line, build in fv.builds.items():
                if line == "cpu" or build.index != "pypi" or build.cuda_source != "wheels":
                    continue
                # Not every upload of a release has its METADATA served: use the first that does.
                meta = next((m for e in wheels.values() if (m := index.metadata(e)) is not None), None)
                pin = cudnn_pin(meta) if meta else None
                facts.append(Fact(framework=fw_name, version=version, line=line, fact="cudnn",
                                  matrix=build.cudnn or "-", index=pin or "unavailable",
                                  where=matrix.where((*vpath, "builds", line, "cudnn"))))
    return facts

