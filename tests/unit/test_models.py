"""Models in the matrix, fetched from a real HTTP server on loopback, verified, and laid out as layers."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from pathlib import Path

import pytest

from builder import models
from builder.errors import MatrixError
from builder.matrix import Selection, expand, load_matrix
from builder.matrix.model import Model
from builder.models import ModelError, context_files, fetch, layer, mirror_from, source_url
from builder.render import dockerfile, render
from builder.smoke import payload
from tests.hub import Hub

from .conftest import SMALL

WEIGHTS = bytes(range(256)) * 40  # 10 KB standing in for a state dict
SHA = hashlib.sha256(WEIGHTS).hexdigest()
NAME = f"resnet18-{SHA[:8]}.pth"
CANONICAL = f"https://download.pytorch.org/models/{NAME}"
USER, PASSWORD = "alice", "s3cret-canary"


def torch_model(url: str = CANONICAL, sha256: str = SHA) -> Model:
    return Model(name="resnet18", hub="torch", url=url, sha256=sha256, input=(1, 3, 224, 224), arch="resnet18")


@pytest.fixture
def serve():
    made: list[Hub] = []

    def start(files: dict[str, bytes], auth: bool = False, short: bool = False) -> Hub:
        made.append(Hub(files, credentials=(USER, PASSWORD) if auth else None, short=short))
        return made[-1]

    yield start
    for server in made:
        server.close()


def cache_entries(cache: Path) -> list[str]:
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------------ matrix
def with_models(block: str, group: int = 0) -> str:
    """SMALL with `block` (the lines of a models: list) added to its images[group]."""
    marker = ["    axes:\n      python: [\"3.9\", \"3.11\", \"3.12\"]\n", "      flavor: [devel]\n",
              "      - {version: \"2.18.0\", cuda: \"12.5\", python: \"3.11\"}\n"][group]
    assert marker in SMALL
    return SMALL.replace(marker, marker + "    models:\n" + block, 1)


TORCH_OK = f'      - {{name: resnet18, hub: torch, arch: resnet18, input: [1, 3, 224, 224], url: "{CANONICAL}", ' \
           f'sha256: "{SHA}"}}\n'


def problems(write_matrix, text: str) -> list[str]:
    path = write_matrix(text)
    with pytest.raises(MatrixError) as info:
        expand(load_matrix(path))
    return [p.replace(str(path), "m.yaml") for p in info.value.lines()]


def test_a_group_model_reaches_its_cells_and_their_claims(write_matrix):
    text = with_models(TORCH_OK, group=1)  # the devel group: torch 2.4.1, which pins torchvision
    cells, _ = expand(load_matrix(write_matrix(text)))
    devel = [c for c in cells if c.flavor == "devel"]
    assert devel and all(c.models == (torch_model(),) for c in devel)
    assert all(not c.models for c in cells if c.flavor != "devel")
    assert devel[0].claims()["models"][0]["sha256"] == SHA
    assert "models" not in next(c for c in cells if c.flavor != "devel").claims()  # old cells' hashes hold


@pytest.mark.parametrize(("block", "expected"), [
    (TORCH_OK.replace("arch: resnet18, ", ""),
     "m.yaml:60: images[1].models[0]: a torch model needs 'arch'"),
    (TORCH_OK.replace(f'sha256: "{SHA}"', f'sha256: "{SHA[:63]}"'),
     "m.yaml:60: images[1].models[0].sha256: '" + SHA[:20]),
    (TORCH_OK.replace(f'sha256: "{SHA}"', f'sha256: "{SHA.upper()}"'), "is not a sha256: 64 lower-case hex digits"),
    (TORCH_OK.replace(f'sha256: "{SHA}"', f'sha256: "{"0" * 64}"'),
     f"the file name says its sha256 starts with {SHA[:8]}, the pin is 00000000..."),
    (TORCH_OK.replace(CANONICAL, "https://user:pw@download.pytorch.org/models/x.pth"), "is not an http(s) model URL"),
    (TORCH_OK.replace(CANONICAL, CANONICAL + "?token=1"), "is not an http(s) model URL"),
    (TORCH_OK.replace(CANONICAL, "https://download.pytorch.org/models/"), "is not an http(s) model URL"),
    (TORCH_OK.replace("hub: torch", "hub: hf"), "Input should be 'torch' or 'tfhub'"),
    (TORCH_OK.replace("input: [1, 3, 224, 224]", "input: []"), "images[1].models[0].input"),
    (TORCH_OK + TORCH_OK.replace("resnet18-", "resnet34-"), "models[1] has the same name as models[0]"),
    (TORCH_OK.replace("hub: torch, arch: resnet18", "hub: tfhub"),
     "m.yaml:60: images[1].models[0]: a tfhub model needs tensorflow, and this group builds torch"),
])
def test_model_mistakes_are_named_at_their_line(write_matrix, block, expected):
    found = problems(write_matrix, with_models(block, group=1))
    assert any(expected in p for p in found), found


def test_a_torch_model_needs_torchvision_in_every_cell_of_its_group(write_matrix):
    # images[0] makes torch 2.1.2 cells too, whose version pins no torchvision: said once, where to fix it.
    found = problems(write_matrix, with_models(TORCH_OK, group=0))
    assert found == ["m.yaml:54: images[0].models[0]: resnet18 needs torchvision in torch 2.1.2's image (certify "
                     "builds the model's torchvision architecture ('arch')): pin it in the companions of m.yaml:29"]


def test_a_tfhub_model_needs_tensorflow_hub_and_tf_keras_explicitly(write_matrix):
    tf = ('      - {name: mobilenet, hub: tfhub, input: [1, 224, 224, 3], '
          'url: "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5", '
          f'sha256: "{SHA}"}}\n')
    found = problems(write_matrix, with_models(tf, group=2))
    assert [p.split(" (")[0] for p in found] == [
        "m.yaml:64: images[2].models[0]: mobilenet needs tensorflow-hub in tensorflow 2.18.0's image",
        "m.yaml:64: images[2].models[0]: mobilenet needs tf-keras in tensorflow 2.18.0's image"]
    assert "Keras 3" in found[1]
    fixed = with_models(tf, group=2).replace(
        '"2.18.0":\n        python: ["3.9", "3.10", "3.11", "3.12"]\n',
        '"2.18.0":\n        python: ["3.9", "3.10", "3.11", "3.12"]\n'
        '        companions: {tensorflow-hub: "0.16.1", tf-keras: "2.18.0"}\n')
    cells, _ = expand(load_matrix(write_matrix(fixed)))
    assert [m.name for c in cells for m in c.models] == ["mobilenet"]


# ------------------------------------------------------------------------------------------------ fetch
def test_fetch_verifies_caches_and_a_model_shared_by_two_cells_is_fetched_once(serve, tmp_path):
    hub = serve({f"/models/{NAME}": WEIGHTS})
    model = torch_model(f"{hub.base}/models/{NAME}")
    got = fetch(model, tmp_path)
    assert got.fetched == len(WEIGHTS) and got.path.read_bytes() == WEIGHTS
    assert cache_entries(tmp_path) == [SHA]
    # Two cells listing the same model, as build asks for them: the second fetches nothing.
    first, fetched_1 = context_files([model], tmp_path)
    second, fetched_2 = context_files([model], tmp_path)
    assert (fetched_1, fetched_2) == (0, 0) and first == second
    assert hub.served == len(WEIGHTS)
    print(f"\nshared model: first cell fetched {got.fetched:,} bytes, second cell {fetched_2:,}")


def test_a_mirror_serves_the_canonical_path_and_its_credentials_never_show(serve, tmp_path, caplog):
    mirror = serve({f"/hub/models/{NAME}": WEIGHTS}, auth=True)
    url = mirror.base.replace("http://", f"http://{USER}:{PASSWORD}@") + "/hub"
    assert mirror_from(None, {"BUILDER_MODEL_MIRROR": url}) == url
    assert mirror_from("http://flag.example", {"BUILDER_MODEL_MIRROR": url}) == "http://flag.example"
    assert mirror_from(None, {}) is None
    caplog.set_level(logging.INFO, logger="builder")
    got = fetch(torch_model(), tmp_path, url)  # download.pytorch.org is unreachable here: only the mirror serves
    assert got.fetched == len(WEIGHTS)
    assert mirror.requests == [f"/hub/models/{NAME}"]
    assert PASSWORD not in caplog.text and USER not in caplog.text and mirror.base in caplog.text
    with pytest.raises(ModelError) as info:
        fetch(torch_model(url=CANONICAL.replace(NAME, "resnet18-00000000.pth"), sha256="0" * 64), tmp_path, url)
    assert "HTTP 404" in str(info.value) and mirror.base in str(info.value)
    assert PASSWORD not in str(info.value) and USER not in str(info.value)


def test_wrong_credentials_are_an_error_without_them(serve, tmp_path):
    mirror = serve({f"/models/{NAME}": WEIGHTS}, auth=True)
    url = mirror.base.replace("http://", f"http://{USER}:wrong-canary@")
    with pytest.raises(ModelError) as info:
        fetch(torch_model(), tmp_path, url)
    assert "HTTP 401" in str(info.value) and "wrong-canary" not in str(info.value)
    assert cache_entries(tmp_path) == []


def test_a_wrong_file_names_the_model_and_both_digests_and_leaves_nothing(serve, tmp_path):
    bad = bytearray(WEIGHTS)
    bad[100] ^= 1
    hub = serve({f"/models/{NAME}": bytes(bad)})
    with pytest.raises(ModelError) as info:
        fetch(torch_model(), tmp_path, hub.base)
    message = str(info.value)
    assert message.startswith("model resnet18: ")
    assert SHA in message and hashlib.sha256(bad).hexdigest() in message
    assert "\n" not in message
    assert cache_entries(tmp_path) == []  # no .part- file, no wrong file under either digest


def test_a_download_that_breaks_off_or_grows_too_large_leaves_nothing(serve, tmp_path):
    hub = serve({f"/models/{NAME}": WEIGHTS}, short=True)
    with pytest.raises(ModelError, match=r"sent 5,120 of 10,240 bytes"):
        fetch(torch_model(), tmp_path, hub.base)
    assert cache_entries(tmp_path) == []
    whole = serve({f"/models/{NAME}": WEIGHTS})
    with pytest.raises(ModelError, match="more than the 4,096"):
        fetch(torch_model(), tmp_path, whole.base, max_bytes=4096)
    assert cache_entries(tmp_path) == []


def test_a_damaged_cache_entry_is_fetched_again(serve, tmp_path):
    hub = serve({f"/models/{NAME}": WEIGHTS})
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / SHA).write_bytes(b"rot")
    assert fetch(torch_model(), tmp_path, hub.base).fetched == len(WEIGHTS)
    assert (tmp_path / "models" / SHA).read_bytes() == WEIGHTS


def test_an_unreachable_hub_says_so_and_points_at_the_mirror(tmp_path):
    model = torch_model(url=f"http://127.0.0.1:9/models/{NAME}")
    with pytest.raises(ModelError, match=r"cannot fetch it from .*--model-mirror"):
        fetch(model, tmp_path)


def test_mirror_must_be_http(tmp_path):
    with pytest.raises(ModelError, match="give an http"):
        mirror_from("ftp://mirror/", {})


def test_tfhub_source_asks_for_the_compressed_format():
    tf = Model(name="m", hub="tfhub", url="https://tfhub.dev/google/m/5", sha256=SHA, input=(1, 4))
    assert source_url(tf, None) == "https://tfhub.dev/google/m/5?tf-hub-format=compressed"
    assert source_url(tf, "http://u:p@mirror:81/base/") == "http://u:p@mirror:81/base/google/m/5?tf-hub-format=compressed"


# ------------------------------------------------------------------------------------------------ layers
def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_torch_layer_is_the_file_at_torch_hubs_cache_path_with_fixed_metadata(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(WEIGHTS)
    data = layer(torch_model(), blob)
    assert data == layer(torch_model(), blob)  # the same model gives the same bytes: the same layer everywhere
    found = members(data)
    assert list(found) == ["opt", "opt/models", "opt/models/torch", "opt/models/torch/hub",
                           "opt/models/torch/hub/checkpoints", f"opt/models/torch/hub/checkpoints/{NAME}"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in found.values()} == {(0, 0, 0, "")}
    assert found[f"opt/models/torch/hub/checkpoints/{NAME}"].mode == 0o644 and found["opt"].mode == 0o755


def module_archive(entries: dict[str, bytes | None], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def test_a_tfhub_layer_is_unpacked_under_the_sha1_of_the_handle_with_its_descriptor(tmp_path):
    url = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5"
    blob = tmp_path / "m.tar.gz"
    blob.write_bytes(module_archive({"./": None, "./saved_model.pb": b"pb", "./variables/": None,
                                     "./variables/variables.index": b"ix"}))
    model = Model(name="mobilenet", hub="tfhub", url=url, sha256=SHA, input=(1, 224, 224, 3))
    key = hashlib.sha1(url.encode("utf8")).hexdigest()  # compressed_module_resolver._module_dir
    root = f"opt/models/tfhub/{key}"
    found = members(layer(model, blob))
    assert {f"{root}/saved_model.pb", f"{root}/variables/variables.index", f"{root}.descriptor.txt"} <= set(found)
    assert models.image_path(model) == "/" + root
    with tarfile.open(fileobj=io.BytesIO(layer(model, blob))) as tar:
        descriptor = tar.extractfile(f"{root}.descriptor.txt").read().decode()  # type: ignore[union-attr]
    assert descriptor.startswith(f"Module: {url}\nDownload Time: ")


@pytest.mark.parametrize(("entries", "symlink", "expected"), [
    ({"../evil": b"x"}, None, "outside the module"),
    ({"/etc/cron.d/x": b"x"}, None, "outside the module"),
    ({"saved_model.pb": b"x"}, "link", "not a regular file or directory"),
])
def test_a_tfhub_archive_that_escapes_or_links_is_refused(tmp_path, entries, symlink, expected):
    blob = tmp_path / "m.tar.gz"
    blob.write_bytes(module_archive(entries, symlink))
    model = Model(name="m", hub="tfhub", url="https://tfhub.dev/x/1", sha256=SHA, input=(1,))
    with pytest.raises(ModelError, match=expected):
        layer(model, blob)


def test_not_an_archive_is_refused(tmp_path):
    blob = tmp_path / "m.tar.gz"
    blob.write_bytes(b"<html>login page</html>")
    with pytest.raises(ModelError, match="not a TF Hub module in the compressed format"):
        layer(Model(name="m", hub="tfhub", url="https://tfhub.dev/x/1", sha256=SHA, input=(1,)), blob)


# ------------------------------------------------------------------------------------------------ render
def model_cell(write_matrix, sha256: str = SHA):
    text = with_models(TORCH_OK.replace(SHA, sha256).replace(SHA[:8], sha256[:8]), group=1)
    cells, _ = expand(load_matrix(write_matrix(text)), Selection(flavor="devel"))
    return cells[0]


def test_the_model_layer_comes_last_and_the_hash_covers_its_sha256(write_matrix):
    cell = model_cell(write_matrix)
    text = dockerfile(cell)
    add = f"ADD {models.context_path(cell.models[0])} /"
    assert add in text and "ENV TORCH_HOME=/opt/models/torch" in text
    # After the environment (and a devel image's layers), before the claims: a change of models rebuilds only
    # the model layers.
    assert text.index("COPY --from=builder /opt/builder-venv/ /") < text.index(add) < text.index("COPY cell.json")
    context = render(cell)
    assert list(context.models) == [models.context_path(cell.models[0])]
    assert not any(path.startswith("models/") for path in context.files)  # build adds the bytes
    other = render(model_cell(write_matrix, "ab" * 32))
    assert other.content_hash != context.content_hash


# ------------------------------------------------------------------------------------------------ payload
MODEL_CLAIM = {"name": "resnet18", "hub": "torch", "url": CANONICAL, "sha256": SHA, "input": [2, 3, 8, 8],
               "arch": "resnet18"}


@pytest.mark.parametrize(("shape", "finite", "seen", "ok", "detail"), [
    ((2, 1000), True, SHA, True, "loaded offline from /p in 0.50 s"),
    ((1, 1000), True, SHA, False, "not a batch of 2"),
    ((2, 1000), False, SHA, False, "non-finite"),
    ((2, 1000), True, "f" * 64, False, f"the cell pins {SHA}"),
])
def test_model_verdict(shape, finite, seen, ok, detail):
    report = payload.Report()
    assert payload.model_verdict(report, MODEL_CLAIM, "/p", 0.5, shape, finite, 0.1, seen) is ok
    check = report.checks[0]
    assert check["name"] == "model.resnet18" and detail in check["detail"]
    assert check["values"]["sha256"] == SHA and check["values"]["load_seconds"] == 0.5


def test_a_model_that_will_not_load_offline_is_a_failed_check():
    class Offline(payload.Adapter):
        name = "torch"

        def load_model(self, model):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    report = payload.Report()
    payload.model_checks(Offline(), report, {"models": [MODEL_CLAIM]})
    assert [(c["name"], c["status"]) for c in report.checks] == [("model.resnet18", "fail")]
    assert "name resolution" in report.checks[0]["detail"]
    payload.model_checks(Offline(), report, {})  # a cell without models adds no check
    assert len(report.checks) == 1


def test_the_certificate_lists_each_model_with_its_check(write_matrix):
    from builder.certify import model_summary

    cell = model_cell(write_matrix)
    passed = {"name": "model.resnet18", "status": "pass", "values": {"load_seconds": 0.25}}
    assert model_summary(cell, [passed]) == [{"name": "resnet18", "hub": "torch", "url": CANONICAL, "sha256": SHA,
                                              "status": "pass", "load_seconds": 0.25}]
    assert model_summary(cell, [])[0]["status"] == "not run"  # a payload that died first proves nothing


TF_MODEL = ('      - {name: mobilenet, hub: tfhub, input: [1, 224, 224, 3], '
            f'url: "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5", sha256: "{SHA}"}}\n')


def tf_text(companions: str, cpu: bool, version: str = "2.18.0") -> str:
    """SMALL with a TF `version` (builds 12.5 and cpu) pinning `companions`, and the model on its cpu or CUDA cell."""
    text = with_models(TF_MODEL, group=2)
    text = text.replace('"2.18.0":\n        python:', f'"{version}":\n        python:', 1)
    text = text.replace('{version: "2.18.0", cuda: "12.5", python: "3.11"}',
                        f'{{version: "{version}", cuda: {"cpu" if cpu else chr(34) + "12.5" + chr(34)}, '
                        'python: "3.11"}', 1)
    return text.replace('          "12.5": {cudnn: "9.3.0.75"}\n',
                        '          "12.5": {cudnn: "9.3.0.75"}\n          cpu: {}\n'
                        f'        companions: {{{companions}}}\n', 1)


@pytest.mark.parametrize(("companions", "cpu", "version", "expected"), [
    # tf-keras requires the `tensorflow` package: pip put tensorflow 2.18.1 over tensorflow-cpu 2.18.0 (measured).
    ('tensorflow-hub: "0.16.1", tf-keras: "2.18.0"', True, "2.18.0", "a second, CUDA-built TensorFlow over it"),
    ('tensorflow-hub: "0.16.1"', True, "2.15.0", "pin tensorflow-hub 0.15.0, the last without tf-keras"),
    ('tensorflow-hub: "0.15.0", tf-keras: "2.18.0"', False, "2.18.0", "imports tf.estimator"),
])
def test_tfhub_models_that_cannot_load_are_refused_with_why(write_matrix, companions, cpu, version, expected):
    found = problems(write_matrix, tf_text(companions, cpu, version))
    assert len(found) == 1 and found[0].startswith("m.yaml:66: images[2].models[0]: mobilenet cannot load in ")
    assert expected in found[0]


@pytest.mark.parametrize(("companions", "cpu", "version"), [
    ('tensorflow-hub: "0.16.1", tf-keras: "2.18.0"', False, "2.18.0"),  # a CUDA cell: `tensorflow` is the framework
    ('tensorflow-hub: "0.15.0"', True, "2.15.0"),  # Keras 2, and a hub without tf-keras
])
def test_tfhub_models_that_can_load_are_accepted(write_matrix, companions, cpu, version):
    cells, _ = expand(load_matrix(write_matrix(tf_text(companions, cpu, version))))
    assert [m.name for c in cells for m in c.models] == ["mobilenet"]


# ------------------------------------------------------------------------------------------------ build
def test_two_cells_sharing_a_model_fetch_it_once_and_get_the_same_layer(write_matrix, serve, tmp_path):
    """The build's own path (build_cells, two jobs at once) with the engine faked: the second cell fetches nothing,
    and both contexts carry byte-identical model layers, named by the same sha256 in their Dockerfiles."""
    from builder.build import BuildOptions, build_cells
    from builder.sources import Sources
    from builder.state import State

    from .fakes import FakeEngine

    text = with_models(TORCH_OK, group=0).replace('    axes:\n      python: ["3.9", "3.11", "3.12"]\n',
                                                  '    axes:\n      version: ["2.4.1"]\n      cuda: ["12.1"]\n'
                                                  '      python: ["3.9", "3.11"]\n', 1)
    cells, _ = expand(load_matrix(write_matrix(text)), Selection(python=("3.9", "3.11"), flavor="runtime",
                                                                  framework="torch"))
    assert len(cells) == 2 and all(c.models == (torch_model(),) for c in cells)
    hub = serve({f"/models/{NAME}": WEIGHTS})
    engine = FakeEngine()
    for cell in cells:
        engine.add_image(cell.base.image)
    options = BuildOptions(state_dir=tmp_path / "state", sources=Sources(proxy=False, cache_dir=tmp_path / "c"),
                           keep_cache=True, jobs=2, model_mirror=hub.base)
    results = build_cells(engine, cells, options)
    assert [r.status for r in results] == ["built", "built"]
    fetched = sorted(State(tmp_path / "state").read_record(c.tag)["model_bytes"] for c in cells)
    assert fetched == [0, len(WEIGHTS)] and hub.served == len(WEIGHTS)
    path = models.context_path(torch_model())
    layers = [b["files"][path] for b in engine.builds]
    assert layers[0] == layers[1] and all(f"ADD {path} /" in b["files"]["Dockerfile"].decode() for b in engine.builds)
    print(f"\nshared model, two cells built at once: fetched {fetched[1]:,} and {fetched[0]:,} bytes")
