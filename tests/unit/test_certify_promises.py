"""certify runs the image promises and writes the SBOM: through the in-memory engine, with the image's own files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder.certify import CertifyOptions, certify_cells
from builder.engine import HASH, TAG
from builder.render import render
from builder.state import State

from .fakes import FakeEngine, Payload
from .golden import cell
from .test_sbom import image_files

CPU_CELL = cell("tensorflow-2.18.0-cpu-py3.11")


class FilesEngine(FakeEngine):
    """The fake engine, with an image's files to read and the environment of each run kept."""

    def __init__(self, files: dict[str, bytes], **kw) -> None:
        super().__init__(**kw)
        self.contents = files
        self.envs: list[dict[str, str] | None] = []

    def read_file(self, image_id: str, path: str) -> bytes | None:
        return self.contents.get(path)

    def run(self, image_id, command, *, env=None, **kw):  # type: ignore[no-untyped-def, override]
        self.envs.append(env)
        return super().run(image_id, command, env=env, **kw)


def checks(*failing: str) -> list[dict]:
    names = ["claims.python", "claims.framework", "claims.cpu_only", "train.cpu.mlp", "train.cpu.conv", "checkpoint",
             "promise.non_root", "promise.clean", "promise.timezone"]
    return [{"name": n, "status": "fail" if n in failing else "pass", "detail": f"{n} detail", "values": {}}
            for n in names]


def certify(tmp_path: Path, payload_checks: list[dict], files: dict[str, bytes] | None = None):
    result = {"schema": 1, "checks": payload_checks, "ok": True, "inventory": {"gpus": [], "driver": None}}
    engine = FilesEngine(image_files() if files is None else files,
                         payload=lambda image, cmd, gpus: Payload(result=result))
    base = engine.add_image(CPU_CELL.base.image)
    info = engine.add_image(CPU_CELL.tag, {HASH: render(CPU_CELL, base_id=base.id).content_hash, TAG: CPU_CELL.tag})
    engine.images[info.id] = dataclasses.replace(info, user="10001:10001")
    [res] = certify_cells(engine, [CPU_CELL], CertifyOptions(state_dir=tmp_path / "state", lock_dir=tmp_path))
    return engine, res, State(tmp_path / "state").read_certificate(CPU_CELL.tag)


def test_certify_asks_for_the_promises_with_the_images_user(tmp_path):
    engine, res, cert = certify(tmp_path, checks())
    [run] = engine.runs
    assert "--promises" in run["command"]
    assert engine.envs == [{"BUILDER_IMAGE_USER": "10001:10001"}]
    assert "/opt/builder/smoke/promises.py" in run["inject"]  # brought in beside the payload
    assert res.level == "cpu-verified"
    assert [c["name"] for c in cert["checks"] if c["name"].startswith("promise.")] == [
        "promise.non_root", "promise.clean", "promise.timezone", "promise.credentials.all_homes"]


def test_a_broken_promise_fails_the_image(tmp_path):
    _, res, cert = certify(tmp_path, checks("promise.clean"))
    assert res.level == "failed" and cert["level"] == "failed"
    assert "promise.clean: promise.clean detail" in cert["reasons"]


def test_the_sbom_is_written_beside_the_certificate_with_its_digest_in_it(tmp_path):
    _, _, cert = certify(tmp_path, checks())
    path = State(tmp_path / "state").certificate_path(CPU_CELL.tag).with_suffix(".cdx.json")
    assert cert["sbom"]["path"] == str(path)
    data = path.read_bytes()
    assert cert["sbom"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert cert["sbom"]["components"] == {"python": 4, "deb": 3, "nvidia_wheels": 1}
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode()) is None
    assert json.loads(data)["metadata"]["component"]["bom-ref"] == cert["image"]["id"]


def test_an_image_without_package_data_gets_a_certificate_that_says_so(tmp_path):
    files = image_files()
    del files["/var/lib/dpkg/status"]
    _, res, cert = certify(tmp_path, checks(), files)
    assert cert["sbom"] == {"format": "CycloneDX 1.6 JSON", "error": "the image has no /var/lib/dpkg/status: "
                            "not a Debian or Ubuntu image"}
    assert res.level == "cpu-verified"
