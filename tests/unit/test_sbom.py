"""The SBOM (builder/sbom.py) from an image's own files, read through a stand-in for the engine's file reader."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder import sbom
from builder.matrix import Selection, expand, load_matrix

SITE = "/opt/venv/lib/python3.11/site-packages"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
STATUS = """\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u9
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: python3.11-minimal
Status: install ok installed
Architecture: amd64
Source: python3.11
Version: 3.11.2-6+deb12u5
Description: Minimal subset of the Python language (version 3.11)

Package: removed-but-configured
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1
Conffiles:
 /etc/timezone abc
Description: time zone and daylight-saving time data
"""
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'
LOCK = "Jinja2==3.1.4\nnvidia-cudnn-cu12==9.1.0.70\npip==24.0\ntensorflow-cpu==2.18.0\n"


def metadata(name: str, version: str, extra: str = "") -> bytes:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {name} summary\n{extra}\n".encode()


def image_files() -> dict[str, bytes]:
    return {
        sbom.LOCK: LOCK.encode(),
        sbom.DPKG_STATUS: STATUS.encode(),
        "/etc/os-release": OS_RELEASE.encode(),
        # an old wheel keeps the project's case in its dist-info name; new ones normalize it
        f"{SITE}/Jinja2-3.1.4.dist-info/METADATA": metadata("Jinja2", "3.1.4", "License: BSD-3-Clause"),
        f"{SITE}/nvidia_cudnn_cu12-9.1.0.70.dist-info/METADATA": metadata(
            "nvidia-cudnn-cu12", "9.1.0.70", "License: NVIDIA Proprietary Software"),
        f"{SITE}/pip-24.0.dist-info/METADATA": metadata("pip", "24.0", "License-Expression: MIT"),
        f"{SITE}/tensorflow_cpu-2.18.0.dist-info/METADATA": metadata(
            "tensorflow-cpu", "2.18.0", "License: Apache 2.0\nLicense-File: LICENSE"),
    }


@pytest.fixture
def cell(write_matrix):
    cells, _ = expand(load_matrix(write_matrix()), Selection(framework="tensorflow"))
    return cells[0]


def generate(cell, files):
    return sbom.generate(files.get, cell, "sha256:" + "ab" * 32, WHEN)


def test_lists_every_python_distribution_and_installed_deb_with_purls(cell):
    text, counts = generate(cell, image_files())
    assert counts == {"python": 4, "deb": 3, "nvidia_wheels": 1}
    doc = json.loads(text)
    purls = sorted(c["purl"] for c in doc["components"])
    assert purls == [
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64&distro=debian-12",
        "pkg:deb/debian/python3.11-minimal@3.11.2-6%2Bdeb12u5?arch=amd64&distro=debian-12",
        "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all&distro=debian-12",
        "pkg:pypi/jinja2@3.1.4",
        "pkg:pypi/nvidia-cudnn-cu12@9.1.0.70",
        "pkg:pypi/pip@24.0",
        "pkg:pypi/tensorflow-cpu@2.18.0",
    ]
    assert doc["metadata"]["component"]["type"] == "container"
    assert doc["metadata"]["component"]["bom-ref"] == "sha256:" + "ab" * 32
    assert doc["metadata"]["timestamp"].startswith("2025-01-02T03:04:05")
    libc = next(c for c in doc["components"] if c["name"] == "libc6")
    assert libc["description"] == "GNU C Library: Shared libraries"
    assert {"name": "builder:deb:source", "value": "glibc"} in libc["properties"]


def test_the_document_is_valid_cyclonedx_1_6(cell):
    text, _ = generate(cell, image_files())
    validator = JsonStrictValidator(SchemaVersion.V1_6)
    assert validator.validate_str(text) is None
    broken = json.loads(text)
    broken["components"][0]["type"] = "not-a-type"
    assert validator.validate_str(json.dumps(broken)) is not None  # the validator does catch a bad document


def test_same_image_gives_the_same_serial_number(cell):
    first, _ = generate(cell, image_files())
    again, _ = generate(cell, image_files())
    assert json.loads(first)["serialNumber"] == json.loads(again)["serialNumber"]
    other, _ = sbom.generate(image_files().get, cell, "sha256:" + "cd" * 32, WHEN)
    assert json.loads(other)["serialNumber"] != json.loads(first)["serialNumber"]


def test_a_distribution_without_metadata_is_still_listed_and_marked(cell):
    files = image_files()
    del files[f"{SITE}/pip-24.0.dist-info/METADATA"]
    doc = json.loads(generate(cell, files)[0])
    pip = next(c for c in doc["components"] if c["name"] == "pip")
    assert pip["purl"] == "pkg:pypi/pip@24.0"
    assert pip["properties"] == [{"name": "builder:metadata", "value": "no dist-info found; from the lock"}]


def test_metadata_that_contradicts_the_lock_is_an_error(cell):
    files = image_files()
    files[f"{SITE}/pip-24.0.dist-info/METADATA"] = metadata("pip", "23.0")
    with pytest.raises(sbom.SbomError, match=r"says pip 23\.0, the lock pip 24\.0"):
        generate(cell, files)


def test_long_licence_text_is_left_out_not_pasted_in(cell):
    files = image_files()
    files[f"{SITE}/pip-24.0.dist-info/METADATA"] = metadata("pip", "24.0", "License: " + "Permission is " * 20)
    doc = json.loads(generate(cell, files)[0])
    assert "licenses" not in next(c for c in doc["components"] if c["name"] == "pip")


@pytest.mark.parametrize("missing,message", [(sbom.LOCK, "has no /opt/venv/requirements.lock"),
                                             (sbom.DPKG_STATUS, "has no /var/lib/dpkg/status")])
def test_write_records_why_there_is_no_sbom(cell, tmp_path, missing, message):
    files = image_files()
    del files[missing]
    cert = tmp_path / "certificates" / "x.json"
    got = sbom.write(files.get, cell, "sha256:" + "ab" * 32, WHEN, cert)
    assert message in got["error"]
    assert not sbom.sbom_path(cert).exists()


def test_write_stores_it_beside_the_certificate_with_its_digest(cell, tmp_path):
    cert = tmp_path / "certificates" / "h11_tensorflow_2.18.0-cpu-py3.11.json"
    got = sbom.write(image_files().get, cell, "sha256:" + "ab" * 32, WHEN, cert)
    path = tmp_path / "certificates" / "h11_tensorflow_2.18.0-cpu-py3.11.cdx.json"
    assert got["path"] == str(path)
    assert got["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got["components"]["python"] == 4


def test_lock_lines_are_read_strictly():
    assert sbom.parse_lock("# c\nA==1\nb-c @ file:///w/b_c-1-py3-none-any.whl\n\n") == [("A", "1"), ("b-c", None)]
    with pytest.raises(sbom.SbomError, match="cannot read the line"):
        sbom.parse_lock("torch>=2\n")
