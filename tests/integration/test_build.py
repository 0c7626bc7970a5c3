"""Real builds on a real engine: what was built, up-to-date skips, the package cache, failures."""

from __future__ import annotations

import shutil

import pytest

from builder.engine import HASH, MANAGED, TAG
from tests.bench import METADATA, SMALL_VERSIONS, small_matrix
from tests.bench import REPOSITORY as BENCH_REPOSITORY

from .conftest import REPOSITORY, ROOT, SIBLING_TAG, TF, TF_TAG, TORCH, TORCH_TAG, interrupt_when, managed_containers

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def run_python(engine, image_id: str, code: str) -> str:
    result = engine.run(image_id, ["python", "-c", code], labels={}, timeout=300, mem_limit="4g")
    assert result.exit_code == 0, result.logs
    return result.logs.strip().splitlines()[-1]


# First in the suite, before the torch image exists: the TensorFlow CUDA cell is one of the largest (its image
# about 5 GB, and its wheels with their stored copies in the package cache about 7 GB), and CI machines vary in free
# disk. It is built the default way (uv through the package proxy). That no build-time source reaches an image is
# test_canary's, for both forms, on a CPU cell: no CUDA layer is scanned, and the builder-stage form's export of
# the nvidia-* wheels (COPY --from=builder /opt/builder-export/) is checked only as rendered text (the golden
# Dockerfiles). The image and this test's package cache go when it ends.
def test_tf_cuda_cell_builds_and_certifies_its_cuda_and_cudnn(engine, work, tmp_path):
    cache = tmp_path / "cache"
    proc = work.cli("build", *TF, "--force", "--cache-dir", str(cache), check=True)
    assert "built" in proc.stdout
    try:
        info = engine.image(TF_TAG)
        assert info is not None
        history = " ".join(str(h.get("CreatedBy", "")) for h in engine.history(info.id))
        assert "packages.builder.invalid" in history, "not the direct form"
        lib_path = next(e for e in info.env if e.startswith("LD_LIBRARY_PATH="))
        assert "/opt/cuda-libs/nvidia/cudnn/lib" in lib_path
        out = run_python(engine, info.id, "import tensorflow as tf; b = tf.sysconfig.get_build_info(); "
                         "print(tf.__version__, b['cuda_version'], b['cudnn_version'])")
        assert out == "2.18.0 12.5.1 9"
        _tf_certificate_is_cpu_verified(engine, work)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        engine.remove_images_with_label(TAG, TF_TAG)


def _tf_certificate_is_cpu_verified(engine, work) -> None:
    proc = work.cli("certify", *TF)
    assert proc.returncode == 0, proc.stderr
    cert = work.certificate(TF_TAG)
    checks = {c["name"]: c for c in cert["checks"]}
    assert cert["level"] == "cpu-verified"
    assert checks["claims.cuda"]["values"]["measured"] == "12.5.1"
    # measured from the library the image gives TF (cudnnGetVersion: 90300), not read off the wheel's version
    assert checks["claims.cudnn"]["values"]["measured"] == "9.3.0"
    assert checks["claims.cudnn"]["values"]["source"].startswith("cudnnGetVersion() of ")
    assert "libcudnn" in checks["claims.cudnn"]["values"]["source"]
    assert checks["claims.cudnn_wheel"]["values"]["measured"] == "9.3.0.75"
    assert checks["train.cpu.conv"]["status"] == "pass"
    assert managed_containers(engine) == []


def test_torch_cell_is_built_as_claimed(engine, work, torch_built):
    info = engine.image(TORCH_TAG)
    # the built image, or the certificate's stamp on it where certify ran first
    assert info is not None and torch_built["image_id"] in (info.id, info.parent)
    labels = info.labels
    assert labels[HASH] == torch_built["content_hash"] and labels[TAG] == TORCH_TAG and labels[MANAGED] == "true"
    assert labels["org.opencontainers.image.base.name"] == "debian:bookworm-slim"
    assert labels["org.opencontainers.image.version"] == "2.4.1"
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert labels["org.opencontainers.image.revision"]
    assert labels["org.builder.cuda"] == "12.1" and labels["org.builder.cudnn"] == "9.1.0.70"
    assert info.user == "10001:10001"
    assert "NVIDIA_REQUIRE_CUDA=cuda>=12.1 driver>=525" in info.env
    out = run_python(engine, info.id, "import os, sys, torch; print(os.getuid(), sys.version_info[:2], "
                     "torch.__version__, torch.version.cuda, torch.backends.cudnn.version())")
    assert out == "10001 (3, 11) 2.4.1+cu121 12.1 90100"
    assert "torch==2.4.1" in torch_built["lock"] and "nvidia-cudnn-cu12==9.1.0.70" in torch_built["lock"]
    assert torch_built["upstream_bytes"] > 1_000_000_000  # a fresh cache: everything came from upstream


def test_the_image_has_the_official_slim_bases_build_configuration_and_trim(engine, work, torch_built):
    """The bootstrapped base (no registry here) is set up as Debian's slim images are, and its path filters kept
    the Python packages' documentation out of the layer apt wrote on it: of its files only copyright notices
    remain (dpkg still makes a filtered package's folders and links, as on the official image)."""
    info = engine.image(TORCH_TAG)
    assert info is not None
    out = run_python(engine, info.id, "import glob, os; print(sorted(os.listdir('/etc/dpkg/dpkg.cfg.d')), "
                     "open('/etc/dpkg/dpkg.cfg.d/docker-apt-speedup').read().strip(), "
                     "sorted({os.path.basename(p) for p in glob.glob('/usr/share/doc/**', recursive=True) "
                     "if os.path.isfile(p) and not os.path.islink(p)}), "
                     "[p for p in glob.glob('/usr/share/man/**', recursive=True) if os.path.isfile(p)], "
                     "os.path.isdir('/usr/share/doc/python3.11'))")
    assert out == "['docker', 'docker-apt-speedup'] force-unsafe-io ['copyright'] [] True"


def test_second_build_is_up_to_date_and_builds_nothing(engine, work, torch_built):
    proc = work.cli("build", *TORCH, check=True)
    row = next(line for line in proc.stdout.splitlines() if line.startswith(TORCH_TAG))
    assert "up to date" in row
    assert "step 1/" not in proc.stderr  # no build was started
    assert work.record(TORCH_TAG)["image_id"] == torch_built["image_id"]


def test_python_only_sibling_fetches_far_less_and_shares_the_cuda_layer(engine, work, torch_built):
    """The py3.9 sibling (another base, another Python) through the same cache: only cp39 wheels are new,
    and its CUDA-libraries layer is byte-identical to the py3.11 cell's."""
    work.cli("build", "--framework", "torch==2.4.1", "--cuda", "12.1", "--python", "3.9", "--force", "--no-cache",
             check=True)
    try:
        _sibling_shares_only_the_cuda_layer(engine, work, torch_built)
    finally:  # no later test needs it: its 2.5 GB of own layers go now
        engine.remove_images_with_label(TAG, SIBLING_TAG)


def _sibling_shares_only_the_cuda_layer(engine, work, torch_built) -> None:
    sibling = work.record(SIBLING_TAG)
    first = torch_built["upstream_bytes"]
    assert sibling["upstream_bytes"] < 0.4 * first, (sibling["upstream_bytes"], first)
    assert sibling["cached_bytes"] > 0.5 * first  # the py3-none nvidia wheels came from the cache
    layers = [set(engine.api.inspect_image(r["image_id"])["RootFS"]["Layers"]) for r in (torch_built, sibling)]
    shared = layers[0] & layers[1]
    assert len(shared) == 1  # different bases: only the CUDA layer is common
    # that common layer is the CUDA libraries' one: the RUN that installs the nvidia-* wheels into /opt/cuda-libs
    # (2.8 GB), made on each base by its own Python, every time pinned
    cuda = [h for h in engine.history(sibling["image_id"]) if "--target /opt/cuda-libs --no-deps" in str(h["CreatedBy"])]
    assert len(cuda) == 1 and cuda[0]["Size"] > 2_000_000_000


def _layers_by_step(engine, image_id: str) -> list[tuple[str, str]]:
    """(the step that made it, its diff id) for each layer: the history entries that are not metadata-only (the
    bench's rule, as its `layer_sizes` pairs them) in history order, paired with RootFS's layers, in the same order."""
    steps = [str(h["CreatedBy"] or "") for h in reversed(engine.history(image_id))
             if not METADATA.match(str(h["CreatedBy"] or "").strip())]
    layers = engine.api.inspect_image(image_id)["RootFS"]["Layers"]
    assert len(steps) == len(layers), (steps, layers)
    return list(zip(steps, layers, strict=True))


def test_a_rebuilt_cell_has_the_same_layers(engine, work, tmp_path):
    """Built twice from nothing (--force --no-cache), one direct cell gives every layer but `cell.json`'s one diff
    id, so a registry that holds them is not sent them again. Before, uv noted the seed wheels' time in RECORD, and
    apt, dpkg, ldconfig and useradd wrote the build's times: every build's layers differed. A small cell: `six`
    stands in for the framework, as in the bench's no-op rows."""
    text = small_matrix((ROOT / "matrix.yaml").read_text())
    matrix = tmp_path / "small.yaml"
    matrix.write_text(text.replace(f"repository: {BENCH_REPOSITORY}-small\n", f"repository: {REPOSITORY}\n", 1))
    version = SMALL_VERSIONS[0]
    tag = f"{REPOSITORY}/tensorflow:{version}-cpu-py3.11-runtime-debian12"
    try:
        built = []
        for _ in range(2):
            work.cli("build", "--framework", f"tensorflow=={version}", "--force", "--no-cache", matrix=matrix,
                     check=True)
            built.append(work.record(tag)["image_id"])
        assert built[0] != built[1]  # two builds, not one answered from the layer cache
        layers = [_layers_by_step(engine, image) for image in built]
        venv = [[diff for step, diff in each if "-m venv --without-pip /opt/venv" in step] for each in layers]
        assert len(venv[0]) == 1 and venv[0] == venv[1], venv
        # the base, apt's Python, the user and the venv; cell.json's COPY makes /opt/builder now, and stays apart
        kept = [[diff for step, diff in each if "/opt/builder/cell.json" not in step] for each in layers]
        assert len(kept[0]) == len(layers[0]) - 1 >= 4 and kept[0] == kept[1], layers
    finally:
        engine.remove_images_with_label(TAG, tag)


def test_interrupted_build_leaves_no_containers(engine, work, torch_built):
    log = work.store.log_path(TORCH_TAG)
    log.unlink(missing_ok=True)

    def installing() -> bool:  # uv has resolved and is installing inside a RUN container
        return log.exists() and "Resolved " in log.read_text() and bool(managed_containers(engine))

    # --no-cache: every step of the direct form is in the engine's layer cache, so a forced rebuild alone would
    # run no RUN at all (and finish, replacing the image the certify tests then look for).
    code, err = interrupt_when(work, ["build", *TORCH, "--force", "--no-cache", "--cache-dir", str(work.cache)],
                               installing, "its install step")
    assert code == 130, err
    assert "interrupted" in err
    assert managed_containers(engine) == []
    info = engine.image(TORCH_TAG)  # the image built before is kept (or its certificate stamp on it)
    assert info is not None and torch_built["image_id"] in (info.id, info.parent)


def test_unreachable_base_names_all_three_attempts(work, tmp_path):
    text = work.matrix.read_text().replace("image: debian:bullseye-slim", "image: example.invalid/none:1")
    text = text.replace("    bootstrap: {suite: bullseye, mirror: http://deb.debian.org/debian}\n", "", 1)
    matrix = tmp_path / "m.yaml"
    matrix.write_text(text)
    proc = work.cli("base", "debian11", "--framework", "torch==2.4.1", "--cuda", "12.1", matrix=matrix)
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert "base debian11 (example.invalid/none:1): not in the engine" in err[0]
    assert "pull failed" in err[0] and "no bootstrap configured" in err[0]


def test_failed_build_shows_the_log_tail_and_keeps_going(work, tmp_path):
    text = work.matrix.read_text().replace('companions: {torchvision: "0.19.1"}', 'companions: {torchvision: "0.0.1"}')
    matrix = tmp_path / "m.yaml"
    matrix.write_text(text)
    proc = work.cli("build", "--framework", "torch==2.4.1", "--cuda", "12.1", "--python", "3.11", matrix=matrix)
    assert proc.returncode == 1
    assert "build failed" in proc.stderr and "whole log:" in proc.stderr
    assert "torchvision==0.0.1" in proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "torch:2.4.1-cuda12.1" in line)
    assert " failed " in row
    assert str(ROOT)  # the repo stays untouched
