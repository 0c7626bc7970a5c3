"""`report`: the page, the summary and the plot, from state written through builder.state.

The state here is made of real shapes: cells of the shipped matrix, build records as build.py writes
them (figures of a real tensorflow-cpu build), certificates with every field certify.py writes and
with the checks of a real payload run (tests/fixtures/report/, from the tensorflow 2.18.0 CPU image),
levels decided by builder.verdict, and publish records as push writes them. The GPU certificate's
checks follow the payload's GPU section (this machine has no GPU); its matmul figure is the H200's.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from builder import report
from builder.certify import digest
from builder.cli import main
from builder.matrix import Cell, Selection, expand, load_matrix
from builder.state import PublishRecord, State
from builder.verdict import decide

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "matrix.yaml"
TF_RESULT = ROOT / "tests" / "fixtures" / "report" / "tensorflow-2.18.0-cpu-result.json"

TF_CPU = "builder/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
TORCH_CUDA = "builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12"
TF_CUDA = "builder/tensorflow:2.18.0-cuda12.5-cudnn9.3-py3.11-runtime-debian12"
TORCH_CPU = "builder/torch:2.6.0-cpu-py3.11-runtime-debian12"  # built, never certified
SELECT = Selection(python="3.11")


@pytest.fixture(scope="module")
def cells() -> dict[str, Cell]:
    found, _ = expand(load_matrix(str(MATRIX)), SELECT)
    return {c.tag: c for c in found}


def payload_result(*, clean: bool, gpu: bool) -> dict[str, Any]:
    """The real payload result; `clean` makes its one failing promise pass, `gpu` adds the GPU section."""
    result = json.loads(TF_RESULT.read_text())
    checks = result["checks"]
    if clean:
        for c in checks:
            if c["name"] == "promise.clean":
                c.update(status="pass", detail="no leftovers in the package caches", values={"leftovers": []})
    if gpu:
        checks[:] = [c for c in checks if c["name"] != "gpu"]
        h200 = {"name": "NVIDIA H200", "capability": "9.0", "memory_mb": 143771}
        checks += [
            {"name": "gpu.visible", "status": "pass", "detail": "1 GPU(s): NVIDIA H200", "values": {"gpus": [h200]}},
            {"name": "gpu.cudnn_conv", "status": "pass", "detail": "convolution ran on cuda:0 through cuDNN",
             "values": {}},
            {"name": "gpu.matches_cpu", "status": "pass", "detail": "max |GPU - CPU| = 2.38e-07 (TF32 off)",
             "values": {"max_abs_diff": 2.38e-07}},
            {"name": "gpu.train_mixed_precision", "status": "pass",
             "detail": "loss 1.1523 -> 0.0871 (must fall below 50% of its start)",
             "values": {"first_loss": 1.1523, "last_loss": 0.0871, "steps": 40, "fraction": 0.5}},
            {"name": "gpu.no_cpu_fallback", "status": "pass", "detail": "parameters live on cuda:0", "values": {}},
            {"name": "gpu.matmul", "status": "pass", "detail": "8192^3 bfloat16 matmul: 790.2 TFLOP/s", "values": {}},
            {"name": "gpu.all_reduce", "status": "skip", "detail": "one GPU: no all-reduce to run", "values": {}},
        ]
        result["inventory"].update(gpus=[h200], matmul_tflops={"dtype": "bfloat16", "n": 8192, "tflops": 790.2},
                                   driver="580.65.06")
    result["ok"] = all(c["status"] != "fail" for c in checks)  # as the payload sums it up
    return result


def certificate(cell: Cell, image_id: str, result: dict[str, Any], *, gpus: bool, log: Path) -> dict[str, Any]:
    """A certificate with the fields certify.py writes, its level decided by the same verdict."""
    outcome = decide(result, 0 if result["ok"] else 1, requested=gpus, require_gpu=False)
    inventory = result["inventory"]
    cert: dict[str, Any] = {
        "schema": 1, "tool": {"name": "builder", "version": "0.1.0"},
        "payload": {"digest": "sha256:" + "5" * 64, "files": ["/opt/builder/smoke/payload.py"]},
        "time": "2026-11-29T13:40:12Z",
        "image": {"id": image_id, "tag": cell.tag, "content_hash": "236b052c" * 8},
        "cell": cell.claims(),
        "host": {"name": "ci-runner-3", "engine": "unix:///var/run/docker.sock", "driver": inventory.get("driver"),
                 "driver_probe": None, "gpu_paths": ["runtime"] if gpus else [],
                 "gpus_requested": -1 if gpus else None, "gpus": inventory.get("gpus", []),
                 "driver_in_container": inventory.get("driver")},
        "level": outcome.level, "reasons": outcome.reasons, "notes": [], "checks": result["checks"],
        "inventory": inventory,
        "run": {"exit_code": 0 if result["ok"] else 1, "seconds": 34.4, "log": str(log)},
        "sbom": {"format": "CycloneDX 1.6", "error": "not made in this test"},
    }
    cert["digest"] = digest(cert)
    return cert


def build(state: State, cell: Cell, *, seconds: float, size: int, fetched: int) -> str:
    image_id = "sha256:" + format(abs(hash(cell.tag)), "x").rjust(64, "a")[:64]
    state.write_record(cell.tag, {
        "tag": cell.tag, "image_id": image_id, "content_hash": "236b052c" * 8, "created": "2026-11-29T13:27:27Z",
        "seconds": seconds, "size": size, "upstream_bytes": fetched, "cached_bytes": 255_835_698,
        "lock": ["absl-py==2.5.1", "tensorflow-cpu==2.18.0"], "cell": cell.claims(), "tool": "0.1.0"})
    state.log_path(cell.tag).write_text("Step 1/24 : FROM debian:bookworm-slim AS os\n ---> 250246ff4f50\n"
                                        "Successfully built " + image_id[7:19] + "\n")
    return image_id


def certify(state: State, cell: Cell, image_id: str, result: dict[str, Any], *, gpus: bool = False) -> dict[str, Any]:
    log = state.log_path(cell.tag, "certify")
    log.write_text("\n".join(f"[{c['status']}] {c['name']}: {c['detail']}" for c in result["checks"]) + "\n")
    cert = certificate(cell, image_id, result, gpus=gpus, log=log)
    state.write_certificate(cell.tag, cert)
    state.index_certificate(cell.tag, cert)
    return cert


def make_state(root: Path, cells: dict[str, Cell]) -> State:
    state = State(root)
    tf = build(state, cells[TF_CPU], seconds=309.5, size=1_519_897_806, fetched=56_850_557)
    certify(state, cells[TF_CPU], tf, payload_result(clean=True, gpu=False))

    torch = build(state, cells[TORCH_CUDA], seconds=453.0, size=5_620_000_000, fetched=2_875_000_000)
    cert = certify(state, cells[TORCH_CUDA], torch, payload_result(clean=True, gpu=True), gpus=True)
    repo = "localhost:5000/ci/builder/torch"
    manifest = "sha256:" + "3f" * 32
    state.write_publish(PublishRecord(
        tag=TORCH_CUDA, registry="localhost:5000/ci", repository=repo, digest=manifest,
        reference=f"{repo}@{manifest}", tags=("2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12",),
        certificate_digest=cert["digest"], certificate_artifact="sha256-" + "3f" * 32 + ".cert",
        image_id=torch, noop=False, seconds=41.2, time="2026-11-29T13:45:00Z"))

    bad = build(state, cells[TF_CUDA], seconds=183.0, size=5_170_000_000, fetched=2_410_000_000)
    certify(state, cells[TF_CUDA], bad, payload_result(clean=False, gpu=False))  # the real run: a failed promise

    build(state, cells[TORCH_CPU], seconds=151.0, size=1_020_000_000, fetched=190_000_000)
    return state


@pytest.fixture()
def state(tmp_path: Path, cells: dict[str, Cell]) -> State:
    return make_state(tmp_path / "state", cells)


class Cards(HTMLParser):
    """Every element with data-tag, by tag: its attributes; and every external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[str, dict[str, str]] = {}
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if "data-tag" in found:
            self.cards[found["data-tag"]] = found
        for key in ("src", "href"):
            value = found.get(key, "")
            if re.match(r"^(https?:)?//", value) or (key == "href" and found.get("rel") == "stylesheet"):
                self.external.append(value)
        if tag in ("script", "link", "iframe"):
            self.external.append(f"<{tag}>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Cards:
    cards = Cards()
    cards.feed(html)
    return cards


# -------------------------------------------------------------------------------------------- tests
def test_entries_read_everything_through_state(state: State, cells: dict[str, Cell], tmp_path: Path) -> None:
    out = tmp_path / "report"
    got = {e.tag: e for e in report.collect(state, list(cells.values()), SELECT, out)}
    assert set(got) == set(cells)

    tf = got[TF_CPU]
    assert (tf.status, tf.level, tf.size, tf.build_s, tf.fetched) == ("built", "cpu-verified", 1_519_897_806, 309.5,
                                                                      56_850_557)
    assert [m.label for m in tf.measures] == ["MLP loss", "CNN loss"]
    assert tf.measures[0].value == "1.39 → 0.12"  # the real run's loss, first and last
    assert tf.registry_digest is None and tf.checks.startswith("14 passed")

    torch = got[TORCH_CUDA]
    assert torch.level == "gpu-certified" and torch.gpus == "1 x NVIDIA H200"
    assert any(m.value.startswith("790.2 TFLOP/s") for m in torch.measures)
    assert torch.registry_digest == "sha256:" + "3f" * 32
    assert torch.reference == f"localhost:5000/ci/builder/torch@sha256:{'3f' * 32}"

    failed = got[TF_CUDA]
    assert failed.level == "failed" and failed.reasons[0].startswith("promise.clean: 32 leftover(s)")
    assert got[TORCH_CPU].level == report.NOT_CERTIFIED and got[TORCH_CPU].status == "built"
    assert sum(e.built for e in got.values()) == 4

    # every link is relative and its file was copied beside the page
    for e in got.values():
        for link in e.links:
            assert not link.href.startswith(("/", "http")) and (out / link.href).is_file()
    assert {link.label for link in torch.links} == {"build log", "certify log", "certificate"}
    assert json.loads((out / torch.links[2].href).read_text())["level"] == "gpu-certified"


def test_a_push_of_an_older_certificate_shows_no_digest(state: State, cells: dict[str, Cell]) -> None:
    cell = cells[TORCH_CUDA]
    record = state.read_record(TORCH_CUDA)
    assert record is not None
    certify(state, cell, record["image_id"], payload_result(clean=True, gpu=False))  # re-certified, not pushed
    e = report.entry(state, TORCH_CUDA, cell.claims(), None)
    assert e.level == "cpu-verified" and e.registry_digest is None
    assert e.publish_note.startswith("pushed 2026-11-29T13:45:00Z with an older certificate")


def test_a_rebuild_after_certify_is_shown(state: State, cells: dict[str, Cell]) -> None:
    record = state.read_record(TF_CPU)
    assert record is not None
    state.write_record(TF_CPU, {**record, "image_id": "sha256:" + "e" * 64})
    assert report.entry(state, TF_CPU, cells[TF_CPU].claims(), None).status == "rebuilt since certified"


def test_page_summary_and_plot(state: State, cells: dict[str, Cell], tmp_path: Path) -> None:
    out = tmp_path / "report"
    made = report.make(state, list(cells.values()), SELECT, out)
    html = (out / "index.html").read_text()
    page = parse(html)
    for tag in cells:
        assert tag in page.cards, tag
    for e in made.built:
        assert page.cards[e.tag]["data-level"] == e.level
    assert page.external == []  # self-contained: no script, stylesheet link, CDN or remote image
    assert "<style>" in html and 'src="data:image/png;base64,' in html
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert made.counts == {"gpu-certified": 1, "cpu-verified": 1, "failed": 1, "not certified": 1,
                           "not built": len(cells) - 4}

    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    assert any(TORCH_CUDA in r and "**gpu-certified**" in r and "sha256:" + "3f" * 32 in r for r in rows)
    assert "### Failed" in summary and "promise.clean" in summary


def test_text_from_state_is_escaped(state: State, cells: dict[str, Cell], tmp_path: Path) -> None:
    cert = state.read_certificate(TF_CUDA)
    assert cert is not None
    evil = '<script>alert(1)</script>"|\nrow'
    state.write_certificate(TF_CUDA, {**cert, "reasons": [evil]})
    out = tmp_path / "report"
    report.make(state, list(cells.values()), SELECT, out)
    html = (out / "index.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    failed_lines = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith(f"- `{TF_CUDA}")]
    assert failed_lines == [f"- `{TF_CUDA}`: <script>alert(1)</script>\"\\| row"]


def test_without_matplotlib_the_page_says_how_to_get_the_plot(state: State, cells: dict[str, Cell],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "report"
    made = report.make(state, list(cells.values()), SELECT, out)
    assert made.plot_png is None and not (out / "plot.png").exists()
    html = (out / "index.html").read_text()
    assert 'id="plot-unavailable"' in html and "pip install -e &#39;.[report]&#39;" in html
    assert "Plot: the plot needs matplotlib" in (out / "summary.md").read_text()


def test_empty_state_says_so(tmp_path: Path, cells: dict[str, Cell], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = main(["--matrix", str(MATRIX), "report", "--python", "3.11", "--state", str(tmp_path / "none"),
                 "--out", str(out)])
    assert code == 0
    assert f"{len(cells)} cells ({len(cells)} not built)" in capsys.readouterr().out
    html = (out / "index.html").read_text()
    assert 'id="empty"' in html and "Nothing has been built yet" in html
    assert "Nothing has been built" in (out / "summary.md").read_text()
    assert not (tmp_path / "none").exists()


def test_cells_the_matrix_no_longer_has_are_still_shown(state: State, cells: dict[str, Cell], tmp_path: Path) -> None:
    old = cells[TF_CPU]
    gone = copy.deepcopy(old.claims())
    gone.update(tag="oldrepo/tensorflow:2.18.0-cpu-py3.11-runtime-debian12", repository="oldrepo")
    state.write_record(gone["tag"], {"tag": gone["tag"], "image_id": "sha256:" + "c" * 64, "seconds": 300.0,
                                     "size": 1_500_000_000, "upstream_bytes": 0, "cached_bytes": 0, "cell": gone})
    entries = {e.tag for e in report.collect(state, list(cells.values()), SELECT)}
    assert gone["tag"] in entries
    assert gone["tag"] not in {e.tag for e in report.collect(state, list(cells.values()), Selection(python="3.12"))}


def test_cli_report(state: State, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["--matrix", str(MATRIX), "report", "--python", "3.11", "--state", str(state.root), "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 gpu-certified, 1 cpu-verified, 1 failed, 1 not certified" in printed
    assert (out / "index.html").is_file() and (out / "summary.md").is_file() and (out / "plot.png").is_file()


# ------------------------------------------------------------------------------- a real browser
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return found


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-extensions", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1000",
           *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def test_chromium_shows_every_built_cell_with_its_level(state: State, cells: dict[str, Cell], tmp_path: Path) -> None:
    out = tmp_path / "report"
    made = report.make(state, list(cells.values()), SELECT, out)
    dom = browse(out / "index.html", tmp_path / "profile", "--dump-dom").stdout
    page = parse(dom)
    assert made.built
    for e in made.built:
        assert e.tag in page.cards, f"{e.tag} is not in the grid chromium rendered"
        assert page.cards[e.tag]["data-level"] == e.level
        assert page.cards[e.tag]["data-status"] == e.status
    assert {t for t, a in page.cards.items() if a["data-status"] == "not built"} == \
        {e.tag for e in made.entries if not e.built}
    assert "790.2 TFLOP/s" in "".join(page.text)

    shots = ROOT / "out"
    shots.mkdir(exist_ok=True)
    shot = shots / "report.png"
    shot.unlink(missing_ok=True)
    browse(out / "index.html", tmp_path / "profile", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_chromium_empty_state(tmp_path: Path, cells: dict[str, Cell]) -> None:
    out = tmp_path / "report"
    report.make(State(tmp_path / "none"), list(cells.values()), SELECT, out)
    dom = browse(out / "index.html", tmp_path / "profile", "--dump-dom").stdout
    assert "Nothing has been built yet" in dom and 'data-tag="' not in dom
