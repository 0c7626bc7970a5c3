"""Pretrained models baked into a real image and loaded offline, from a mirror on loopback.

The public hubs are not reachable here, so the test makes a small torchvision-architecture state dict (random
weights, squeezenet1_1) inside the session's torch image and serves it on loopback with the hub's URL shape, behind
a mirror that wants a password. The model cell is the session's torch cell (conftest TORCH) in a matrix copy with
another repository and the model added: every layer before the model's is the torch image's own.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from builder.matrix.model import Model
from builder.models import image_path
from tests.hub import Hub
from tests.integration.conftest import REPOSITORY, TORCH, TORCH_TAG, Work

pytestmark = pytest.mark.engine

MODELS_REPOSITORY = f"{REPOSITORY}-models"
MODEL_TAG = TORCH_TAG.replace(f"{REPOSITORY}/", f"{MODELS_REPOSITORY}/", 1)
CANONICAL = "https://download.pytorch.org/models"  # unreachable here: only the mirror serves it
USER, PASSWORD = "modeluser", "canary-model-secret-7f3a"


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def make_weights(tmp: Path) -> tuple[str, bytes]:
    """squeezenet1_1 with random weights (seeded), saved by the torch image itself: (file name, bytes) with the
    file name in torchvision's `<name>-<sha256 prefix>.pth` shape."""
    tmp.chmod(0o777)
    code = ("import torch, torchvision; torch.manual_seed(0); "
            "torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), '/out/w.pth')")
    proc = docker("run", "--rm", "--network", "none", "-u", "0", "-v", f"{tmp}:/out", TORCH_TAG, "python", "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = (tmp / "w.pth").read_bytes()
    return f"squeezenet1_1-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


def models_matrix(work: Work, name: str, sha256: str) -> Path:
    """The session's matrix with another repository and the model added to the torch group TORCH comes from."""
    text = work.matrix.read_text().replace(f"repository: {REPOSITORY}\n", f"repository: {MODELS_REPOSITORY}\n", 1)
    block = ("    exclude:\n      - {cuda: cpu}\n    models:\n      - {name: squeezenet, hub: torch, arch: squeezenet1_1,"
             f" input: [2, 3, 64, 64],\n         url: \"{CANONICAL}/{name}\",\n         sha256: \"{sha256}\"}}\n")
    assert "    exclude:\n      - {cuda: cpu}\n" in text
    text = text.replace("    exclude:\n      - {cuda: cpu}\n", block, 1)
    path = work.root / "matrix-models.yaml"
    path.write_text(text)
    return path


def layers(tag: str) -> list[str]:
    proc = docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_model_from_a_mirror_is_baked_certified_and_loads_offline(work: Work, torch_built: dict,
                                                                    tmp_path: Path, engine) -> None:
    name, data = make_weights(tmp_path)
    sha256 = hashlib.sha256(data).hexdigest()
    matrix = models_matrix(work, name, sha256)
    url = f"{CANONICAL}/{name}"
    model = Model(name="squeezenet", hub="torch", url=url, sha256=sha256, input=(2, 3, 64, 64),
                  arch="squeezenet1_1")
    try:
        with Hub(credentials=(USER, PASSWORD), files={f"/models/{name}": data}) as hub:
            started = time.monotonic()
            proc = work.cli("build", *TORCH, matrix=matrix, env={"BUILDER_MODEL_MIRROR": hub.mirror})
            seconds = time.monotonic() - started
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert hub.served == len(data) and hub.refused == 0
        record = work.record(MODEL_TAG)
        assert record["model_bytes"] == len(data)

        # The model adds one layer, after the torch image's own: its CUDA libraries and environment (5 GB) are the
        # same layers (its last, cell.json, now claims the model and follows the model's layer). The OS layers are
        # the engine's cache: where several builds made them (another run's apt-get or useradd step), it may take
        # another run's, so those are only counted.
        base, built = layers(TORCH_TAG), layers(MODEL_TAG)
        assert len(built) == len(base) + 1
        assert built[0] == base[0] and built[len(base) - 3:len(base) - 1] == base[-3:-1], "a heavy layer was rebuilt"
        other = [i for i in range(len(base) - 1) if built[i] != base[i]]
        sizes = [json.loads(line) for line in docker("image", "history", "--no-trunc", "--format", "{{json .}}",
                                                     MODEL_TAG).stdout.splitlines()]
        add = next(h for h in sizes if "ADD file:" in h["CreatedBy"])  # the newest ADD: the model's (history: newest first)
        add_step = next(s for s in record["steps"] if s[1].startswith("ADD models/"))
        print(f"\nmodel layer: {add['Size']} ({len(data):,} bytes of weights), diff id {built[-2][:19]}; "
              f"its build step {add_step[2]} s; model cell build {seconds:.0f} s (torch cell {torch_built['seconds']} s); "
              f"fetched {record['model_bytes']:,} bytes from the mirror; OS layers taken from another cached chain: "
              f"{other}")

        # The mirror's credentials reach no log, label, history or environment.
        inspect = docker("image", "inspect", MODEL_TAG).stdout + docker("image", "history", "--no-trunc",
                                                                         MODEL_TAG).stdout
        log_text = "".join(p.read_text(errors="replace") for p in Path(work.state).rglob("*") if p.is_file())
        for text in (proc.stdout, proc.stderr, inspect, log_text, json.dumps(record)):
            assert PASSWORD not in text and USER not in text

        # certify loads it with the network off, through torch.hub, and runs a forward pass.
        cert_proc = work.cli("certify", *TORCH, matrix=matrix)
        assert cert_proc.returncode == 0, cert_proc.stdout + cert_proc.stderr[-3000:]
        cert = work.certificate(MODEL_TAG)
        check = next(c for c in cert["checks"] if c["name"] == "model.squeezenet")
        assert check["status"] == "pass", check
        assert check["values"]["sha256"] == sha256 and check["values"]["path"] == image_path(model)
        assert check["values"]["output_shape"] == [2, 1000]
        print(f"certify: {check['detail']}")

        # By hand, as a user would: no network, the hub's own API, the canonical URL.
        code = (f"import torch, torchvision; sd = torch.hub.load_state_dict_from_url({url!r}); "
                "m = torchvision.models.squeezenet1_1(); m.load_state_dict(sd); m.eval(); "
                "print(tuple(m(torch.zeros(1, 3, 64, 64)).shape), torch.hub.get_dir())")
        run = docker("run", "--rm", "--network", "none", MODEL_TAG, "python", "-c", code)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["(1,", "1000)", "/opt/models/torch/hub"], run.stdout

        # One byte changed on the mirror, with a cache that does not have the model yet: the build refuses it.
        cached = work.cache / "models" / sha256
        assert cached.is_file()
        cached.unlink()
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0x01
        bad_sha = hashlib.sha256(bad).hexdigest()
        with Hub(credentials=(USER, PASSWORD), files={f"/models/{name}": bytes(bad)}) as hub:
            refused = work.cli("build", *TORCH, "--force", "--model-mirror", hub.mirror, matrix=matrix)
        assert refused.returncode != 0
        assert sha256 in refused.stderr and bad_sha in refused.stderr, refused.stderr[-2000:]
        assert "squeezenet" in refused.stderr and PASSWORD not in refused.stderr
        assert list((work.cache / "models").iterdir()) == []  # nothing half-written, nothing wrong kept
        assert layers(MODEL_TAG) == built  # the good image stays
    finally:
        docker("rmi", "-f", MODEL_TAG)


def test_models_matrix_is_sound(work: Work, tmp_path: Path) -> None:
    """The matrix the model test writes is accepted (cheap: no engine work), so a refusal above is the model's."""
    matrix = models_matrix(work, "squeezenet1_1-0123abcd.pth", "0123abcd" + "0" * 56)
    proc = work.cli("matrix", *TORCH, matrix=matrix)
    assert proc.returncode == 0, proc.stderr
    assert MODEL_TAG in proc.stdout



# TensorFlow 2.16 on is Keras 3: tensorflow_hub then needs tf-keras, which requires the `tensorflow` package, so a
# tensorflow-cpu cell cannot hold a tfhub model (the matrix refuses it; test_models unit tests pin why). TF 2.15's
# CPU cell, with tensorflow-hub 0.15.0 (the last without tf-keras), takes one; it is built here twice, without and
# with the model, under two repositories of this test.
TF = ["--framework", "tensorflow==2.15.0", "--cuda", "cpu", "--python", "3.11"]
TF_PLAIN_REPOSITORY = f"{REPOSITORY}-tf215"
TF_PLAIN_TAG = f"{TF_PLAIN_REPOSITORY}/tensorflow:2.15.0-cpu-py3.11-runtime-debian12"
TF_MODEL_TAG = f"{MODELS_REPOSITORY}/tensorflow:2.15.0-cpu-py3.11-runtime-debian12"
TF_HANDLE = "https://tfhub.dev/builder-test/tiny-classifier/1"  # tfhub.dev's URL shape; unreachable here
TF_VERSION_BLOCK = '      "2.15.0":\n        python: ["3.9", "3.10", "3.11"]\n'
TF_GROUP = '  - framework: tensorflow\n    bases: [debian12]\n    include:\n      - {version: "2.15.0", cuda: cpu, python: "3.11"}\n'


def tf_matrix(work: Work, repository: str, sha256: str | None) -> Path:
    """The session's matrix with `repository`, tensorflow-hub 0.15.0 pinned for TF 2.15.0, its CPU cell asked for,
    and (with `sha256`) the module added to that cell's group."""
    text = work.matrix.read_text().replace(f"repository: {REPOSITORY}\n", f"repository: {repository}\n", 1)
    assert TF_VERSION_BLOCK in text and "\nimages:\n" in text
    text = text.replace(TF_VERSION_BLOCK, TF_VERSION_BLOCK + '        companions: {tensorflow-hub: "0.15.0"}\n', 1)
    group = TF_GROUP
    if sha256:
        group += ("    models:\n      - {name: tiny, hub: tfhub, input: [2, 4], "
                  f'url: "{TF_HANDLE}", sha256: "{sha256}"}}\n')
    text = text.replace("\nimages:\n", "\nimages:\n" + group, 1)
    path = work.root / f"matrix-{repository.replace('/', '_')}.yaml"
    path.write_text(text)
    return path


def make_module(tmp: Path, image: str) -> bytes:
    """A tiny TF2 SavedModel (a seeded 4 -> 3 softmax layer), saved by `image` itself, packed as a hub's compressed
    module: a .tar.gz of the SavedModel directory's contents."""
    tmp.chmod(0o777)
    code = ("import tensorflow as tf\n"
            "class M(tf.Module):\n"
            "    def __init__(self):\n"
            "        self.w = tf.Variable(tf.random.stateless_normal([4, 3], seed=(1, 2)))\n"
            "    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])\n"
            "    def __call__(self, x):\n"
            "        return tf.nn.softmax(tf.matmul(x, self.w))\n"
            "tf.saved_model.save(M(), '/out/module')\n")
    proc = docker("run", "--rm", "--network", "none", "-u", "0", "-v", f"{tmp}:/out", image, "python", "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp / "module", arcname=".")
    return buf.getvalue()


def test_a_tfhub_module_is_baked_certified_and_loads_offline(work: Work, tmp_path: Path, engine) -> None:
    try:
        # the model cell below then reuses this build's layers: the install runs once
        work.cli("build", *TF, matrix=tf_matrix(work, TF_PLAIN_REPOSITORY, None), check=True)
        data = make_module(tmp_path, TF_PLAIN_TAG)
        sha256 = hashlib.sha256(data).hexdigest()
        matrix = tf_matrix(work, MODELS_REPOSITORY, sha256)
        model = Model(name="tiny", hub="tfhub", url=TF_HANDLE, sha256=sha256, input=(2, 4))
        with Hub(credentials=(USER, PASSWORD), files={"/builder-test/tiny-classifier/1": data}) as hub:
            started = time.monotonic()
            proc = work.cli("build", *TF, matrix=matrix, env={"BUILDER_MODEL_MIRROR": hub.mirror})
            seconds = time.monotonic() - started
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert hub.served == len(data)
        record = work.record(TF_MODEL_TAG)
        assert record["model_bytes"] == len(data)
        # The environment's layer is the plain cell's (the direct build's RUN names no port or path of the host):
        # nothing was installed again for a change after it.
        pip_step = work.store.log_path(TF_MODEL_TAG).read_text().split("-m venv --without-pip /opt/venv", 1)[1].splitlines()[1:8]
        assert any("Using cache" in line for line in pip_step), pip_step
        base, built = layers(TF_PLAIN_TAG), layers(TF_MODEL_TAG)
        assert len(built) == len(base) + 1 and built[len(base) - 3:len(base) - 1] == base[-3:-1]
        add_step = next(s for s in record["steps"] if s[1].startswith("ADD models/"))
        print(f"\ntfhub module: {len(data):,} bytes, layer diff id {built[-2][:19]}, its step {add_step[2]} s, "
              f"model cell build {seconds:.0f} s")

        cert_proc = work.cli("certify", *TF, matrix=matrix)
        assert cert_proc.returncode == 0, cert_proc.stdout + cert_proc.stderr[-3000:]
        check = next(c for c in work.certificate(TF_MODEL_TAG)["checks"] if c["name"] == "model.tiny")
        assert check["status"] == "pass", check
        assert check["values"]["path"] == image_path(model) and check["values"]["output_shape"] == [2, 3]
        print(f"certify: {check['detail']}")

        code = (f"import tensorflow as tf, tensorflow_hub as hub; m = hub.load({TF_HANDLE!r}); "
                f"print(hub.resolve({TF_HANDLE!r}), tuple(m(tf.ones([1, 4])).shape))")
        run = docker("run", "--rm", "--network", "none", TF_MODEL_TAG, "python", "-c", code)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split()[-3:] == [image_path(model), "(1,", "3)"], run.stdout
    finally:
        docker("rmi", "-f", TF_MODEL_TAG, TF_PLAIN_TAG)


def test_a_model_is_the_same_layer_on_any_base(engine, tmp_path: Path) -> None:
    """The layer builder makes for a model unpacks to the same diff id whatever it lands on (two Debian releases
    here, as two cells on different bases): a registry stores it once, and a pull of the second image skips it."""

    from builder.labels import MANAGED, TAG
    from builder.models import context_path, layer

    blob = tmp_path / "weights"
    blob.write_bytes(bytes(range(256)) * 4096)
    sha256 = hashlib.sha256(blob.read_bytes()).hexdigest()
    model = Model(name="m", hub="torch", url=f"{CANONICAL}/m-{sha256[:8]}.pth", sha256=sha256, input=(1,), arch="x")
    path = context_path(model)
    diff_ids, tags = [], []
    try:
        for base in ("debian:bookworm-slim", "debian:bullseye-slim"):
            tag = f"{MODELS_REPOSITORY}/layer-probe:{base.split(':')[1]}"
            tags.append(tag)
            files = {"Dockerfile": f"FROM {base}\nADD {path} /\n".encode(), path: layer(model, blob)}
            image = engine.build(files, tag=tag, labels={MANAGED: "true", TAG: tag}, on_line=lambda _: None,
                                 stop=threading.Event(), nocache=True)
            diff_ids.append(layers(image)[-1])
        assert diff_ids[0] == diff_ids[1], diff_ids
        print(f"\nthe same model on bookworm and bullseye: one layer, {diff_ids[0][:19]}")
    finally:
        docker("rmi", "-f", *tags)
