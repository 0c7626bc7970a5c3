"""A CycloneDX SBOM of one image, made from its own files: the venv's distributions and the dpkg database.

Nothing in the image is run and nothing is resolved on the host: the lock pip wrote at build time
names the distributions, each one's METADATA gives its name, version, summary and licence, and
/var/lib/dpkg/status lists the OS packages. cyclonedx-python-lib writes the document. It is stored
beside the certificate, and the certificate records its sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import License
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from builder import __version__
from builder.errors import BuilderError
from builder.matrix.model import Cell
from builder.render import CUDA_LIBS

VENV = "/opt/venv"
LOCK = f"{VENV}/requirements.lock"
DPKG_STATUS = "/var/lib/dpkg/status"
# /usr/lib first: /etc/os-release is a symlink to it on Debian and Ubuntu.
OS_RELEASE = ("/usr/lib/os-release", "/etc/os-release")
SPEC = "CycloneDX 1.6 JSON"
# One image's SBOM: the same image id gives the same serial number, so re-certifying replaces, not adds.
SERIAL_NAMESPACE = uuid.UUID("8c5d7a4e-3f0b-4e55-9d36-6c0f8f3f0b11")
# A licence field longer than this is the licence's text, not its name: it is left out.
LICENSE_NAME_MAX = 100

Reader = Callable[[str], "bytes | None"]


class SbomError(BuilderError):
    """The image's own package data could not be read or made sense of."""


@dataclass(frozen=True, kw_only=True)
class PythonPackage:
    name: str
    version: str
    summary: str | None = None
    license: str | None = None
    metadata: str | None = None  # the METADATA path read, None where no dist-info was found


@dataclass(frozen=True, kw_only=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    source: str | None = None
    maintainer: str | None = None
    summary: str | None = None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> list[tuple[str, str | None]]:
    """`pip freeze --all` lines -> (name, version); `name @ url` lines have no version here."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+)|@\s*\S+)", line)
        if match is None:
            raise SbomError(f"{LOCK}: cannot read the line {line[:80]!r}")
        out.append((match[1], match[2]))
    return out


def dist_info_candidates(name: str, version: str | None) -> list[str]:
    """Where pip put a distribution's dist-info: new wheels normalize the name, old ones keep its case."""
    if version is None:
        return []
    names = [re.sub(r"[-_.]+", "_", name).lower(), re.sub(r"[-.]+", "_", name), name]
    return list(dict.fromkeys(f"{n}-{version}.dist-info" for n in names))


def parse_metadata(text: str, path: str) -> PythonPackage:
    headers = HeaderParser().parsestr(text)
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        raise SbomError(f"{path}: no Name or Version")
    license_ = headers.get("License-Expression") or headers.get("License")
    if license_ and ("\n" in license_.strip() or len(license_) > LICENSE_NAME_MAX or license_.strip() == "UNKNOWN"):
        license_ = None
    return PythonPackage(name=str(name), version=str(version), summary=headers.get("Summary") or None,
                         license=license_.strip() if license_ else None, metadata=path)


def python_packages(read: Reader, python: str) -> list[PythonPackage]:
    """Every distribution in the image's venv, from its lock and each one's METADATA."""
    lock = read(LOCK)
    if lock is None:
        raise SbomError(f"the image has no {LOCK}: it was not built by this tool, or pip freeze failed")
    # The venv's own, then the shared CUDA layer's (a direct build installs the nvidia-* wheels there).
    sites = [f"{VENV}/lib/python{python}/site-packages", CUDA_LIBS.rsplit("/", 1)[0]]
    found = []
    for name, version in parse_lock(lock.decode("utf-8", "replace")):
        package = None
        for path in (f"{site}/{d}/METADATA" for d in dist_info_candidates(name, version) for site in sites):
            data = read(path)
            if data is not None:
                package = parse_metadata(data.decode("utf-8", "replace"), path)
                break
        if package is None:
            if version is None:
                raise SbomError(f"{LOCK}: {name} has no version and no METADATA was found for it")
            package = PythonPackage(name=name, version=version)
        elif canonical(package.name) != canonical(name) or (version and package.version != version):
            raise SbomError(f"{package.metadata} says {package.name} {package.version}, the lock {name} {version}")
        found.append(package)
    return sorted(found, key=lambda p: canonical(p.name))


def parse_dpkg_status(text: str) -> list[DebPackage]:
    """The installed packages of a dpkg status file (paragraphs of `Key: value`, continuation lines indented)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip():
            continue
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") and key is not None:
                continue  # a continuation (long description, conffiles): not needed here
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        status = fields.get("Status", "").split()
        if status[-1:] != ["installed"] or "Package" not in fields or "Version" not in fields:
            continue
        source = fields.get("Source", "").split(" ")[0] or None
        out.append(DebPackage(name=fields["Package"], version=fields["Version"],
                              architecture=fields.get("Architecture", ""), source=source,
                              maintainer=fields.get("Maintainer"), summary=fields.get("Description") or None))
    return sorted(out, key=lambda p: (p.name, p.architecture))


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def os_packages(read: Reader) -> tuple[dict[str, str], list[DebPackage]]:
    release: dict[str, str] = {}
    for path in OS_RELEASE:
        data = read(path)
        if data is not None:
            release = parse_os_release(data.decode("utf-8", "replace"))
            break
    status = read(DPKG_STATUS)
    if status is None:
        raise SbomError(f"the image has no {DPKG_STATUS}: not a Debian or Ubuntu image")
    return release, parse_dpkg_status(status.decode("utf-8", "replace"))


def _python_component(p: PythonPackage, licenses: LicenseFactory) -> Component:
    purl = PackageURL(type="pypi", name=canonical(p.name), version=p.version)
    found: list[License] = [licenses.make_from_string(p.license)] if p.license else []
    props = [] if p.metadata else [Property(name="builder:metadata", value="no dist-info found; from the lock")]
    return Component(type=ComponentType.LIBRARY, name=p.name, version=p.version, purl=purl, bom_ref=purl.to_string(),
                     description=p.summary, licenses=found, properties=props)


def _deb_component(p: DebPackage, release: dict[str, str]) -> Component:
    distro = release.get("ID", "debian")
    qualifiers = {"arch": p.architecture} if p.architecture else {}
    if release.get("VERSION_ID"):
        qualifiers["distro"] = f"{distro}-{release['VERSION_ID']}"
    purl = PackageURL(type="deb", namespace=distro, name=p.name, version=p.version, qualifiers=qualifiers)
    props = [Property(name="builder:deb:source", value=p.source)] if p.source else []
    return Component(type=ComponentType.LIBRARY, name=p.name, version=p.version, purl=purl, bom_ref=purl.to_string(),
                     description=p.summary, publisher=p.maintainer, properties=props)


def generate(read: Reader, cell: Cell, image_id: str, when: datetime) -> tuple[str, dict[str, int]]:
    """The SBOM of one image as CycloneDX 1.6 JSON, and how many components of each kind it lists."""
    pythons = python_packages(read, cell.python)
    release, debs = os_packages(read)
    repository, _, tag = cell.tag.rpartition(":")
    image = Component(type=ComponentType.CONTAINER, name=repository, version=tag, bom_ref=image_id,
                      description=f"{cell.framework} {cell.version}, {cell.cuda_label}, Python {cell.python}",
                      properties=[Property(name="builder:image.id", value=image_id),
                                  Property(name="builder:tag", value=cell.tag),
                                  Property(name="builder:base", value=cell.base.image)])
    bom = Bom(serial_number=uuid.uuid5(SERIAL_NAMESPACE, image_id))
    bom.metadata.timestamp = when
    bom.metadata.component = image
    bom.metadata.tools.components.add(Component(type=ComponentType.APPLICATION, name="builder", version=__version__))
    licenses = LicenseFactory()
    components = [_python_component(p, licenses) for p in pythons] + [_deb_component(p, release) for p in debs]
    seen: set[str] = set()
    for component in components:
        ref = str(component.bom_ref.value)
        if ref in seen:  # one package listed twice (a lock that names it twice): keep one
            continue
        seen.add(ref)
        bom.components.add(component)
    bom.register_dependency(image, list(bom.components))
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    return text, {"python": len(pythons), "deb": len(debs),
                  "nvidia_wheels": sum(canonical(p.name).startswith("nvidia-") for p in pythons)}


def sbom_path(certificate: Path) -> Path:
    """Beside the certificate: certificates/<tag>.json -> certificates/<tag>.cdx.json."""
    return certificate.with_suffix(".cdx.json")


def write(read: Reader, cell: Cell, image_id: str, when: datetime, certificate: Path) -> dict[str, Any]:
    """Make and store the SBOM; returns what the certificate records of it (or why there is none)."""
    try:
        text, counts = generate(read, cell, image_id, when)
    except BuilderError as exc:
        return {"format": SPEC, "error": str(exc)}
    data = text.encode("utf-8")
    path = sbom_path(certificate)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"format": SPEC, "path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "components": counts}
