"""Certification of real images: the torch cell, an image that lies, and clean-up on every path (the TensorFlow
cell's certificate is checked in test_build.py, right after its build)."""

from __future__ import annotations

import io
import tarfile

import pytest

from builder.engine import CERT_DIGEST, HASH, LEVEL, MANAGED, SESSION, TAG, GpuRequest
from builder.gpu import gpu_paths
from builder.matrix import Selection, expand, load_matrix
from builder.render import render

from .conftest import TORCH, TORCH_TAG, interrupt_when, managed_containers

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_torch_certificate_proves_cuda_and_cudnn(engine, work, torch_built):
    proc = work.cli("certify", *TORCH)
    assert proc.returncode == 0, proc.stderr
    assert TORCH_TAG in proc.stdout and "cpu-verified" in proc.stdout
    cert = work.certificate(TORCH_TAG)
    assert cert["level"] == "cpu-verified" and cert["reasons"] == []
    assert cert["image"]["id"] == torch_built["image_id"]
    assert cert["image"]["content_hash"] == torch_built["content_hash"]
    checks = {c["name"]: c for c in cert["checks"]}
    assert checks["claims.cuda"]["status"] == "pass" and checks["claims.cuda"]["values"]["measured"] == "12.1"
    assert checks["claims.cudnn"]["status"] == "pass" and checks["claims.cudnn"]["values"]["measured"] == "9.1.0"
    assert checks["train.cpu.mlp"]["status"] == "pass" and checks["checkpoint"]["status"] == "pass"
    assert checks["gpu"]["status"] == "skip"
    assert cert["inventory"]["cuda"] == "12.1" and cert["inventory"]["cudnn"] == "9.1.0"
    assert cert["inventory"]["nvidia_wheels"]["nvidia-cudnn-cu12"] == "9.1.0.70"
    assert cert["tool"]["name"] == "builder" and cert["time"].endswith("Z")
    assert cert["host"]["gpus_requested"] is None
    # the level and digest are on the image for `docker image inspect`, and in the index
    info = engine.image(TORCH_TAG)
    assert info.labels[LEVEL] == "cpu-verified" and info.labels[CERT_DIGEST] == cert["digest"]
    assert info.labels[HASH] == torch_built["content_hash"]
    assert work.store.index()[TORCH_TAG].digest == cert["digest"]
    assert managed_containers(engine) == []


def test_certifying_again_is_current_and_forcing_does_not_stack_layers(engine, work, torch_built):
    work.cli("certify", *TORCH, check=True)
    first = engine.image(TORCH_TAG)
    again = work.cli("certify", *TORCH, check=True)
    assert "current:" in again.stdout and engine.image(TORCH_TAG).id == first.id  # nothing ran, nothing stamped
    work.cli("certify", *TORCH, "--force", check=True)
    second = engine.image(TORCH_TAG)
    assert second.id != first.id
    assert work.certificate(TORCH_TAG)["image"]["id"] == torch_built["image_id"]
    assert len(engine.history(second.id)) == len(engine.history(first.id))


def _lying_image(engine, work, tmp_path, torch_built):
    """The real torch image, relabelled as a cell that claims cuDNN 9.3: the image lies about its cuDNN."""
    text = work.matrix.read_text().replace('"12.1": {cudnn: "9.1.0.70"}', '"12.1": {cudnn: "9.3.0.75"}', 1)
    matrix = tmp_path / "lying.yaml"
    matrix.write_text(text)
    cells, _ = expand(load_matrix(matrix), Selection(framework="torch", framework_version="2.4.1", cuda="12.1",
                                                     python="3.11", flavor="runtime"))
    base = engine.image(cells[0].base.image)
    ctx = render(cells[0], base_id=base.id)  # the hash a build against this engine's base would have
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("cell.json")
        info.size = len(ctx.files["cell.json"])
        tar.addfile(info, io.BytesIO(ctx.files["cell.json"]))
    cid = engine.api.create_container(torch_built["image_id"], command=["true"], labels={MANAGED: "true"})["Id"]
    try:
        engine.api.put_archive(cid, "/opt/builder", buf.getvalue())
        repo, _, tag = cells[0].tag.rpartition(":")
        engine.api.commit(cid, repository=repo, tag=tag,
                          changes=[f"LABEL {HASH}={ctx.content_hash}", f"LABEL {TAG}={cells[0].tag}"])
    finally:
        engine.api.remove_container(cid, force=True)
    return matrix, cells[0].tag


def test_image_lying_about_its_cudnn_fails_with_the_reason(engine, work, tmp_path, torch_built):
    matrix, tag = _lying_image(engine, work, tmp_path, torch_built)
    proc = work.cli("certify", "--only", tag, matrix=matrix)
    assert proc.returncode == 1
    assert "failed" in proc.stdout
    assert "claims.cudnn: claims cuDNN 9.3, torch loads 9.1.0" in proc.stdout
    cert = work.certificate(tag)
    assert cert["level"] == "failed"
    # the measured value, then where it was measured: "(torch.backends.cudnn.version())"
    assert any(r.startswith("claims.cudnn: claims cuDNN 9.3, torch loads 9.1.0 (") for r in cert["reasons"])
    assert engine.image(tag).labels[LEVEL] == "failed"
    assert managed_containers(engine) == []


def test_gpus_all_on_an_engine_that_cannot_serve_them_is_a_clear_failure(engine, work, torch_built):
    if engine.gpu_probe(torch_built["image_id"], GpuRequest(count=-1)) is not None:
        pytest.skip("this engine serves GPU requests (runtime, hook or CDI): test_gpu_request covers it")
    proc = work.cli("certify", *TORCH, "--gpus", "all")
    assert proc.returncode == 1
    assert "cannot hand out GPUs (no NVIDIA runtime, hook or CDI device)" in proc.stdout + proc.stderr
    assert managed_containers(engine) == []


def test_require_gpu_fails_without_a_gpu(engine, work, torch_built):
    if gpu_paths(engine.info()):
        pytest.skip("this engine has an NVIDIA runtime or CDI devices")
    proc = work.cli("certify", *TORCH, "--require-gpu", "--force")
    assert proc.returncode == 1
    assert "--require-gpu" in proc.stdout


def test_interrupted_certify_leaves_no_containers(engine, work, torch_built):
    def running() -> bool:
        return bool(engine.api.containers(filters={"label": SESSION}))

    code, err = interrupt_when(work, ["certify", *TORCH, "--force"], running, "its smoke-test container", timeout=120)
    assert code == 130, err
    assert managed_containers(engine) == []


def test_certify_before_build_says_what_to_do(work):
    proc = work.cli("certify", "--framework", "torch==2.6.0", "--cuda", "cpu")
    assert proc.returncode == 1
    assert "not built" in proc.stdout and "run `python -m builder build` first" in proc.stdout
