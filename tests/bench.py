"""`make bench`: builder against the naive recipe, side by side in one run; writes docs/bench.json and docs/bench.md.

The naive recipe is what a team without builder writes: one single-stage Dockerfile per cell on the same base,
apt's python3 and python3-venv, `pip install` of the same pins into a venv with the host's CA bundle copied in,
built by the classic builder through the SDK with its own layer cache. Absolute times on a shared 2-core machine
are noise, so every figure is a ratio against that baseline measured in the same run.

    python -m tests.bench [SELECTORS]          # default: no cold builds (builds what a no-op needs, once)
    BENCH_FULL=1 python -m tests.bench ...     # adds the cold and warm builds of the selected cell
    BENCH_OUT=bench-torch python -m tests.bench --framework torch==2.4.1 ...   # docs/bench-torch.{md,json}
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REPOSITORY = "bench"  # the bench's own images: bench/..., bench-naive/..., bench-small/...
NAIVE_LABEL = "org.builder.bench.naive"
DEFAULT_SELECT = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
# Ten small cells for the ten-cell no-op: the TensorFlow CPU adapter with a tiny pure-Python package standing
# in for the framework (the up-to-date path reads labels, never the image's bytes, so size does not matter).
SMALL_PACKAGE = "six"
SMALL_VERSIONS = ("1.8.0", "1.9.0", "1.10.0", "1.11.0", "1.12.0", "1.13.0", "1.14.0", "1.15.0", "1.16.0",
                  "1.17.0")
# A wheel built for one CPython (cp39, cp311, ...): the only thing a Python-only sibling should fetch again.
CP_TAG = re.compile(r"-cp(\d+)-")
# The nvidia/cuda runtime bases the naive recipe would start FROM, as published: no registry is reachable here,
# so the naive image's size on that base is computed from these (uncompressed bytes, what `docker images` shows
# after a pull). A per-layer breakdown was not found in reachable public material; the whole image is enough for
# the sum. Add a tag with its source to compute another CUDA line.
NVIDIA_CUDA_PUBLISHED: dict[str, dict[str, Any]] = {
    "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04": {
        "bytes": 3_379_534_165,
        "layers": 10,
        "config": "sha256:02f0c5f1a54bd88a5242a21ef690ab6826c7d36eb2b8134b32860a258427d97e",
        "source": "github.com/AhmadAFS1/MuseTalk, docs/GHCR_PUBLICATION_FINDINGS.md at c06624da9d7c (the pulled "
                  "base's image config digest, 3,379,534,165 uncompressed bytes, ten layers); the same image id "
                  "02f0c5f1a54b shows as 3.38GB in `docker images` output quoted in other public READMEs",
    },
}


@dataclass(frozen=True, kw_only=True)
class Row:
    name: str
    figure: float | None
    baseline: float | None
    unit: str
    target: str  # e.g. "<= 1.0": compared with the ratio (figure / baseline), or the figure when no baseline
    limit: float | None
    runs: str  # "median of 3" or "1 run"
    how: str  # "measured" or "computed", and from what
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.figure is None or not self.baseline:
            return None
        return self.figure / self.baseline

    @property
    def met(self) -> bool | None:
        value = self.ratio if self.baseline is not None else self.figure
        if value is None or self.limit is None:
            return None
        return value <= self.limit


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown(rows: list[Row], header: str) -> str:
    """The table the README links to: one row per figure, with its baseline, ratio, target and verdict."""
    lines = [header, "", "| figure | builder | naive baseline | ratio | target | met | runs | how |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(f"| {r.name} | {_num(r.figure, r.unit)} | {_num(r.baseline, r.unit)} | "
                     f"{'-' if r.ratio is None else f'{r.ratio:.2f}'} | {r.target} | {met} | {r.runs} | {r.how} |")
    notes = [f"- **{r.name}**: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def naive_dockerfile(base_image: str, requirements: list[str]) -> str:
    """The obvious recipe: single stage, system Python, the CA bundle copied in, pip into a venv."""
    pins = " ".join(requirements)
    return (f"FROM {base_image}\n"
            "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv "
            "&& rm -rf /var/lib/apt/lists/*\n"
            "COPY ca.pem /etc/ssl/pip-ca.pem\n"
            f"RUN python3 -m venv /opt/venv && PIP_CERT=/etc/ssl/pip-ca.pem /opt/venv/bin/pip install "
            f"--no-cache-dir {pins}\n"
            "ENV PATH=/opt/venv/bin:$PATH\n")


def context_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def floor_bytes(history: list[dict[str, Any]]) -> int:
    """The least an image of this cell can weigh: the base OS, the Python install and the installed environment,
    from `docker history`; users, claims and caches are the overhead. The classic builder writes a stage copy
    (`COPY --from=builder /opt/venv ...`) as `COPY dir:<digest> in /opt/venv`; an imported base has no CreatedBy."""
    total = 0
    for layer in history:
        created = str(layer.get("CreatedBy") or "")
        if (not created or ("apt-get install" in created and "python" in created) or "COPY --from=builder" in created
                or "#(nop) COPY dir:" in created):
            total += int(layer.get("Size") or 0)
    return total


def nvidia_cuda_runtime(matrix_doc: dict[str, Any], cuda: str | None) -> str | None:
    """The nvidia/cuda runtime tag (with the matrix's cuDNN) a naive recipe for this CUDA line would start FROM;
    None for a CPU cell, where that base makes no sense."""
    line = (matrix_doc.get("cuda") or {}).get(cuda or "cpu")
    if not line or not line.get("image"):
        return None
    image = line["image"]
    oses = list(image.get("os") or ["ubuntu22.04"])
    os_tag = "ubuntu22.04" if "ubuntu22.04" in oses else oses[-1]
    cudnn = f"-{image['cudnn']}" if image.get("cudnn") else ""
    return f"nvidia/cuda:{image['tag']}{cudnn}-runtime-{os_tag}"


def naive_on_published_base(naive_size: int, own_base_size: int, published_base: int) -> int:
    """The naive image's size on another base: its own layers above the base it was built on (Python, the CA
    bundle, the venv), on top of the published base's bytes."""
    return published_base + naive_size - own_base_size


class Usage:
    """What a run used of the machine, from /proc: CPU busy time (all cores), bytes written to disk and bytes
    received on the network, between start() and stop(). Says what limits a parallel build."""

    def __init__(self) -> None:
        self.start_at: tuple[float, int, int, int] = (0.0, 0, 0, 0)
        self.cpu_s = self.disk_mb = self.net_mb = self.seconds = 0.0

    @staticmethod
    def _now() -> tuple[float, int, int, int]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        busy = sum(int(v) for v in fields) - int(fields[3]) - int(fields[4])  # all but idle and iowait
        written = 0
        for line in Path("/proc/diskstats").read_text().splitlines():
            parts = line.split()
            if re.fullmatch(r"(sd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+)", parts[2]):
                written += int(parts[9]) * 512
        received = sum(int(line.split(":", 1)[1].split()[0]) for line in
                       Path("/proc/net/dev").read_text().splitlines()[2:] if not line.strip().startswith("lo:"))
        return time.monotonic(), busy, written, received

    def start(self) -> None:
        self.start_at = self._now()

    def stop(self) -> None:
        end, (t0, busy0, disk0, net0) = self._now(), self.start_at
        self.seconds = end[0] - t0
        self.cpu_s = (end[1] - busy0) / os.sysconf("SC_CLK_TCK")
        self.disk_mb, self.net_mb = (end[2] - disk0) / 1e6, (end[3] - net0) / 1e6

    def text(self) -> str:
        cores = os.cpu_count() or 1
        share = self.cpu_s / (self.seconds * cores) if self.seconds else 0.0
        return (f"CPU {share:.0%} of {cores} cores busy, disk {self.disk_mb:,.0f} MB written "
                f"({self.disk_mb / max(self.seconds, 1e-9):.0f} MB/s), network {self.net_mb:,.0f} MB in")


def decomposition(steps: list[list[Any]]) -> str:
    """Where a build's time went, from its record's steps ([n, instruction, seconds]): the OS Python layer, the
    builder stage's install step (venv, fetch through the proxy, pip, export, and its layer commit), the final
    stage's copies out of the builder stage (copy and commit), and every other step (metadata, user, labels)."""
    parts = {"OS Python (apt)": 0.0, "install step (fetch, pip, commit)": 0.0,
             "COPY --from=builder (copy, commit)": 0.0, "other steps": 0.0}
    for _, instruction, seconds in steps:
        text = str(instruction)
        part = ("OS Python (apt)" if text.startswith("RUN apt-get") else
                "install step (fetch, pip, commit)" if text.startswith("RUN") and " -m venv " in text else
                "COPY --from=builder (copy, commit)" if text.startswith("COPY --from=builder") else "other steps")
        parts[part] += float(seconds)
    total = sum(parts.values()) or 1.0
    return ", ".join(f"{name} {s:.0f} s ({s / total:.0%})" for name, s in parts.items())


def twice_fetched(first: dict[str, int], second: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """What the second cell fetched upstream, split into cp-tagged wheels (expected) and anything else (not)."""
    cp = {name: size for name, size in second.items() if CP_TAG.search(name)}
    other = {name: size for name, size in second.items() if name not in cp and name.endswith(".whl")}
    return cp, other


def synthetic_matrix(text: str, copies: int) -> str:
    """The project's matrix with every framework version cloned `copies` times (2.4.1 -> 2.4.101, 2.4.102, ...):
    the same rules, bases and groups, about 82 x (copies + 1) cells."""
    doc = yaml.safe_load(text)
    clones: dict[str, list[str]] = {}
    for framework in doc["frameworks"].values():
        versions = framework["versions"]
        for version in list(versions):
            clones[version] = [f"{version}{i:02d}" for i in range(1, copies + 1)]
            for clone in clones[version]:
                versions[clone] = versions[version]
    for group in doc["images"]:
        axis = (group.get("axes") or {}).get("version")
        if axis:
            group["axes"]["version"] = [v for version in axis for v in (version, *clones.get(version, []))]
        for entry in group.get("include") or []:
            if "version" in entry:
                group["include"] = [*group["include"], *({**entry, "version": c} for c in clones[entry["version"]])]
    return yaml.safe_dump(doc, sort_keys=False)


def bench_matrix(text: str) -> str:
    """The project's matrix under the bench's own repository, plus the small cells (see SMALL_PACKAGE)."""
    doc = yaml.safe_load(text)
    doc["repository"] = REPOSITORY
    return yaml.safe_dump(doc, sort_keys=False)


def small_matrix(text: str) -> str:
    doc = yaml.safe_load(text)
    doc["repository"] = f"{REPOSITORY}-small"
    tf = doc["frameworks"]["tensorflow"]
    tf["cpu_package"] = SMALL_PACKAGE
    tf["versions"] = {v: {"python": ["3.11"], "builds": {"cpu": {}}} for v in SMALL_VERSIONS}
    doc["frameworks"] = {"tensorflow": tf}
    doc["images"] = [{"framework": "tensorflow", "bases": ["debian12"], "axes": {"python": ["3.11"]}}]
    return yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------------------------------- measuring


class Bench:
    def __init__(self, work: Path, full: bool) -> None:
        import docker

        self.work = work
        self.full = full
        self.client = docker.from_env(timeout=3600)
        # Kept between runs (records of earlier builds feed the size, certify and sibling rows).
        self.state = Path(os.environ.get("BENCH_STATE", ROOT / ".builder" / "bench"))
        self.cache = Path(os.environ.get("BENCH_CACHE", work / "cache"))
        self.matrix = work / "matrix.yaml"
        self.matrix.write_text(bench_matrix((ROOT / "matrix.yaml").read_text()))
        self.small = work / "small.yaml"
        self.small.write_text(small_matrix((ROOT / "matrix.yaml").read_text()))
        ca = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
        self.ca = Path(ca).read_bytes() if ca else b""

    def cli(self, *args: str, matrix: Path | None = None, cache: Path | None = None) -> float:
        cmd = [sys.executable, "-m", "builder", "--matrix", str(matrix or self.matrix), *args]
        if args[0] in ("build", "certify"):
            cmd += ["--state", str(self.state)]
        if args[0] == "build":
            cmd += ["--cache-dir", str(cache or self.cache)]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CI": "1"})
        took = time.monotonic() - started
        if proc.returncode != 0:
            sys.exit(f"bench: `{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
        return took

    def cells(self, select: list[str], matrix: Path | None = None) -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "builder", "--matrix", str(matrix or self.matrix), "matrix",
                              *select, "--format", "json"], capture_output=True, text=True, cwd=ROOT, check=True)
        return list(json.loads(out.stdout))

    def image(self, ref: str) -> Any:
        import docker.errors

        try:
            return self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            return None

    def naive_noop(self, cell: dict[str, Any]) -> float:
        """The naive recipe's no-op as a Makefile loop runs it: `docker build` (classic builder) on a cached
        image, timed around the CLI process. Without the docker CLI: the SDK's build call alone."""
        if not shutil.which("docker"):
            return self.naive_build(cell)[0]
        folder = self.work / "naive" / cell["tag"].replace("/", "_").replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Dockerfile").write_text(naive_dockerfile(cell["base"], list(cell["claims"]["requirements"])))
        (folder / "ca.pem").write_bytes(self.ca)
        tag = f"{REPOSITORY}-naive/{cell['tag'].split('/', 1)[1]}"
        started = time.monotonic()
        subprocess.run(["docker", "build", "-q", "--label", f"{NAIVE_LABEL}=true", "-t", tag, str(folder)],
                       capture_output=True, check=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
        return time.monotonic() - started

    def naive_build(self, cell: dict[str, Any], nocache: bool = False) -> tuple[float, str]:
        """Build the naive image of a cell; returns (seconds, image id). Timed around the SDK call only."""
        requirements = list(cell["claims"]["requirements"])
        files = {"Dockerfile": naive_dockerfile(cell["base"], requirements).encode(), "ca.pem": self.ca}
        tag = naive_tag(cell)
        started = time.monotonic()
        image_id = ""
        for event in self.client.api.build(fileobj=io.BytesIO(context_tar(files)), custom_context=True, tag=tag,
                                           labels={NAIVE_LABEL: "true"}, rm=True, forcerm=True, pull=False,
                                           nocache=nocache, network_mode="host", decode=True):
            if "error" in event:
                sys.exit(f"bench: naive build of {cell['tag']} failed: {event['error']}")
            if "aux" in event and "ID" in event["aux"]:
                image_id = event["aux"]["ID"]
        return time.monotonic() - started, image_id


def installer_row(bench: Bench, cell: dict[str, Any], image: str) -> Row:
    """pip against uv, side by side: the same wheels (downloaded once on the host) installed into a fresh venv in
    a container of `image` (the naive image: the cell's base and Python), offline, each in its own container,
    wheels read once before either so both find them in the page cache. uv is installed from PyPI into the
    bench's work folder."""
    reqs = list(cell["claims"]["requirements"])
    wheels, tools = bench.work / "wheels", bench.work / "uv-tools"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "--only-binary=:all:",
                    "--python-version", cell["python"], *reqs], check=True, capture_output=True)
    if not (tools / "bin" / "uv").exists():
        subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
        subprocess.run([str(tools / "bin" / "pip"), "install", "-q", "uv"], check=True, capture_output=True)
    for wheel in wheels.iterdir():
        wheel.read_bytes()
    pins = " ".join(reqs)
    commands = {  # timed: the install alone, into a venv made (with pip, as the template makes it) beforehand
        "pip": f"/tmp/v/bin/pip install -q --no-cache-dir --no-compile --no-index --find-links /w {pins}",
        "uv": f"uv pip install -q --no-cache --no-index --find-links /w --python /tmp/v/bin/python {pins}",
    }
    took: dict[str, float] = {}
    for name, command in commands.items():
        container = bench.client.containers.create(
            image, ["sh", "-c", f"python3 -m venv /tmp/v && s=$(date +%s.%N) && {command} "
                    "&& e=$(date +%s.%N) && echo \"$s $e\""],
            network_mode="none", user="0", labels={NAIVE_LABEL: "true"},
            volumes={str(wheels): {"bind": "/w", "mode": "ro"},
                     str(tools / "bin" / "uv"): {"bind": "/usr/local/bin/uv", "mode": "ro"}})
        try:
            container.start()
            status = container.wait(timeout=1800)
            out = container.logs().decode(errors="replace").strip().splitlines()
            if status.get("StatusCode") != 0 or not out:
                sys.exit(f"bench: {name} install in {image} failed: {out[-5:]}")
            start, end = (float(v) for v in out[-1].split())
            took[name] = end - start
        finally:
            container.remove(force=True)
    size = sum(w.stat().st_size for w in wheels.iterdir()) / 1e6
    return Row(name="installer: uv against pip (same wheels, offline, in a container)", figure=took["uv"],
               baseline=took["pip"], unit="s", target="choose with numbers", limit=None, runs="1 run",
               how="measured (the install alone, timed inside the container)",
               note=f"{len(list(wheels.iterdir()))} wheels, {size:,.0f} MB, into a fresh venv on the cell's base "
                    "and Python; neither compiles .pyc")


def naive_tag(cell: dict[str, Any]) -> str:
    return f"{REPOSITORY}-naive/{cell['tag'].split('/', 1)[1]}"


def planning_row() -> Row:
    """Load, validate, expand and render a synthetic ~1,000-cell matrix, in-process; ms per cell."""
    from builder.matrix import expand, load_matrix
    from builder.render import render

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        path = Path(tmp, "matrix.yaml")
        path.write_text(synthetic_matrix((ROOT / "matrix.yaml").read_text(), copies=11))
        counts: list[int] = []

        def once() -> float:
            started = time.perf_counter()
            cells, _ = expand(load_matrix(str(path)))
            for cell in cells:
                render(cell)
            counts.append(len(cells))
            return (time.perf_counter() - started) * 1000 / len(cells)

        per_cell = median_of(3, once)
    return Row(name=f"planning, per cell ({counts[0]} cells)", figure=per_cell, baseline=None, unit="ms",
               target="< 5 ms", limit=5.0, runs="median of 3", how="measured (load, validate, expand, render)")


def main(select: list[str]) -> int:
    full = os.environ.get("BENCH_FULL") == "1"
    select = select or DEFAULT_SELECT
    load_at_start, started = os.getloadavg(), time.monotonic()
    rows: list[Row] = [planning_row()]
    print(f"planning: {rows[0].figure:.2f} ms per cell", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="builder-bench-"))
    # builder as installed: pip byte-compiles a package it installs. Without this, a machine that sets
    # PYTHONDONTWRITEBYTECODE (these do) compiles cli.py and uptodate.py again in every no-op, about 12 ms.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "builder")], capture_output=True, check=True)
    bench = Bench(work, full)
    bench.cli("base", "debian12")
    cells = bench.cells(select)
    one = [cells[0]]
    sel1 = ["--only", one[0]["tag"]]
    record: dict[str, Any] = {}

    if full:  # cold: empty package cache and no layer cache on either side; warm: the cache full, no layer cache
        cold = work / "cold-cache"
        from builder.state import State

        b_cold = bench.cli("build", *sel1, "--force", "--no-cache", cache=cold)
        cold_steps = (State(bench.state).read_record(one[0]["tag"]) or {}).get("steps") or []
        n_cold, _ = bench.naive_build(one[0], nocache=True)
        b_warm = bench.cli("build", *sel1, "--force", "--no-cache", cache=cold)
        warm_steps = (State(bench.state).read_record(one[0]["tag"]) or {}).get("steps") or []
        n_warm, _ = bench.naive_build(one[0], nocache=True)
        rows += [
            Row(name="cold build, 1 cell", figure=b_cold, baseline=n_cold, unit="s", target="<= 1.0", limit=1.0,
                runs="1 run", how="measured", note=f"where builder's time went: {decomposition(cold_steps)}"),
            Row(name="warm build (package cache full, no layer cache)", figure=b_warm, baseline=n_warm, unit="s",
                target="<= 0.5", limit=0.5, runs="1 run", how="measured",
                note="the naive recipe has no package cache: its warm build downloads everything again; where "
                     f"builder's time went: {decomposition(warm_steps)}"),
        ]
        if len(cells) > 1:  # e.g. a Python-only sibling selected too: its bytes come from the records
            for cell in cells[1:]:
                bench.cli("build", "--only", cell["tag"], cache=cold)
    # What a no-op needs: the cell built on both sides (not timed).
    bench.cli("build", *sel1)
    _, naive_id = bench.naive_build(one[0])
    b_noop = median_of(3, lambda: bench.cli("build", *sel1))
    n_noop = median_of(3, lambda: bench.naive_noop(one[0]))
    rows.append(Row(name="no-op rebuild, 1 cell", figure=b_noop, baseline=n_noop, unit="s", target="<= 1.0",
                    limit=1.0, runs="median of 3", how="measured",
                    note="builder: `python -m builder build` as a new process; naive: `docker build` (classic "
                         "builder) as a new process, as a Makefile loop runs it"))

    small = bench.cells([], bench.small)
    bench.cli("build", "-j", "2", matrix=bench.small)
    for cell in small:
        bench.naive_build(cell)
    b_noop10 = median_of(3, lambda: bench.cli("build", matrix=bench.small))
    n_noop10 = median_of(3, lambda: sum(bench.naive_noop(c) for c in small))
    rows.append(Row(name=f"no-op rebuild, {len(small)} small cells", figure=b_noop10, baseline=n_noop10, unit="s",
                    target="<= 0.2", limit=0.2, runs="median of 3", how="measured",
                    note=f"{len(small)} cells of a bench matrix where `{SMALL_PACKAGE}` stands in for the framework "
                         "(ten 1.5-5 GB cells do not fit this 2-core machine's time; the no-op path reads labels, "
                         "not image bytes)"))

    # j2 vs j1: two small cells rebuilt with --force (the OS and Python layers stay cached; each build's
    # sources/ names its own proxy port, so the venv, pip and final-stage steps run again).
    two = ["--only", small[0]["tag"], "--only", small[1]["tag"]]
    use1, use2 = Usage(), Usage()
    use1.start()
    j1 = bench.cli("build", *two, "--force", matrix=bench.small)
    use1.stop()
    use2.start()
    j2 = bench.cli("build", *two, "--force", "-j", "2", matrix=bench.small)
    use2.stop()
    rows.append(Row(name="-j2 against -j1, 2 small cells (--force)", figure=j2, baseline=j1, unit="s",
                    target="<= 0.75", limit=0.75, runs="1 run", how="measured (/proc: CPU, disk, network)",
                    note=f"-j1: {use1.text()}; -j2: {use2.text()}. The machine's whole load counts (other "
                         "processes too), so a busy CPU here is this build's or a neighbour's"))

    # Size against its floor and against the naive image.
    from builder.state import State

    record = State(bench.state).read_record(one[0]["tag"]) or {}
    image = bench.image(one[0]["tag"])
    if image is not None:
        floor = floor_bytes(bench.client.api.history(image.id))
        naive = bench.client.images.get(naive_id)
        size = int(image.attrs["Size"])
        rows += [
            Row(name="image size against its floor", figure=size / 1e6, baseline=floor / 1e6, unit="MB",
                target="<= 1.10", limit=1.10, runs="1 run", how="measured (`docker history`: base, Python, "
                "installed environment)"),
            Row(name="image size against the naive image", figure=size / 1e6,
                baseline=int(naive.attrs["Size"]) / 1e6, unit="MB", target="<= 1.0", limit=1.0, runs="1 run",
                how="measured"),
        ]
        rows.append(nvidia_cuda_row(bench, one[0], size, int(naive.attrs["Size"])))
    # Certify: time per image, and its share of the cell's build time (the record's).
    c_time = bench.cli("certify", *sel1, "--force", "--gpus", "none")
    build_s = float(record.get("seconds") or 0) or None
    rows.append(Row(name="certify, per image (CPU)", figure=c_time, baseline=build_s, unit="s", target="share",
                    limit=None, runs="1 run", how="measured; baseline: that image's build time from its record",
                    note="ratio = certify time / build time" if build_s else "no build record of this image in the "
                    "bench state (it was built earlier): run with BENCH_FULL=1 for the share"))
    rows += sibling_rows(bench)
    if full:
        rows.append(installer_row(bench, one[0], naive_tag(one[0])))

    header = (f"# Benchmark: builder against the naive recipe\n\nMeasured {time.strftime('%Y-%m-%d')} on "
              f"{os.cpu_count()} cores by `make bench`{' (BENCH_FULL=1)' if full else ''}; cell "
              f"`{one[0]['tag']}`. Ratio = builder / naive (lower is better).\n\nThe machine's load average "
              f"(1 min) was {load_at_start[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end of this "
              f"{(time.monotonic() - started) / 60:.0f}-minute run: other work shares these cores, which is why "
              "every figure is a ratio measured in the same run. What the misses come from and what would close "
              "them: [bench-notes.md](bench-notes.md).")
    out = os.environ.get("BENCH_OUT", "bench")  # e.g. BENCH_OUT=bench-torch beside the default cell's table
    (DOCS / f"{out}.md").write_text(markdown(rows, header))
    (DOCS / f"{out}.json").write_text(json.dumps({"select": select, "full": full, "cell": one[0]["tag"], "rows": [
        {**asdict(r), "ratio": r.ratio, "met": r.met} for r in rows]}, indent=2) + "\n")
    print(markdown(rows, header))
    cleanup(bench, [one[0]["tag"]])
    return 0


def nvidia_cuda_row(bench: Bench, cell: dict[str, Any], size: int, naive_size: int) -> Row:
    """The naive image on the nvidia/cuda base it would use, computed (that base cannot be pulled here)."""
    tag = nvidia_cuda_runtime(yaml.safe_load((ROOT / "matrix.yaml").read_text()), cell["claims"].get("cuda"))
    published = NVIDIA_CUDA_PUBLISHED.get(tag or "")
    own_base = bench.image(cell["base"])
    name = f"image size against the naive image on {tag or 'nvidia/cuda'}"
    if tag is None or published is None or own_base is None:
        why = ("a CPU cell: its naive recipe has no nvidia/cuda base" if tag is None else
               f"no published size of {tag} in NVIDIA_CUDA_PUBLISHED" if published is None else
               f"the cell's base {cell['base']} is not on this engine")
        return Row(name=name, figure=None, baseline=None, unit="MB", target="<= 1.0", limit=1.0, runs="-",
                   how="not computed", note=why)
    own = int(own_base.attrs["Size"])
    computed = naive_on_published_base(naive_size, own, int(published["bytes"]))
    return Row(name=name, figure=size / 1e6, baseline=computed / 1e6, unit="MB", target="<= 1.0", limit=1.0,
               runs="1 run", how="computed: the published base + this run's measured naive layers",
               note=f"{tag}: {published['bytes'] / 1e6:,.0f} MB in {published['layers']} layers (published: "
                    f"{published['source']}) + the naive image's own layers above {cell['base']} "
                    f"({(naive_size - own) / 1e6:,.0f} MB, measured); builder's image measured")


def sibling_rows(bench: Bench) -> list[Row]:
    """A Python-only sibling from build records with per-file counts (a BENCH_FULL run or an earlier build)."""
    from builder.state import State

    records = [r for r in State(bench.state).records() if r.get("fetched_files")]
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        claims = r.get("cell") or {}
        by_key.setdefault((str(claims.get("framework")), str(claims.get("version")), str(claims.get("cuda"))),
                          []).append(r)
    for group in by_key.values():
        if len(group) >= 2:
            first, second = sorted(group, key=lambda r: r.get("created", ""))[:2]
            cp, other = twice_fetched(first["fetched_files"], second["fetched_files"])
            listed = ", ".join(f"{n} ({s / 1e6:,.0f} MB)" for n, s in sorted(cp.items()))
            return [Row(name="Python-only sibling, bytes fetched", figure=second["upstream_bytes"] / 1e6,
                        baseline=first["upstream_bytes"] / 1e6, unit="MB", target="only cp-tagged wheels again",
                        limit=None, runs="1 run", how="computed from build records (the proxy's per-file counts)",
                        note=f"fetched again: {listed or 'nothing'}; not cp-tagged: {sorted(other) or 'none'}")]
    return [Row(name="Python-only sibling, bytes fetched", figure=None, baseline=None, unit="MB",
                target="only cp-tagged wheels again", limit=None, runs="-", how="not measured",
                note="no two records of cells differing only in Python in this run's state")]


def cleanup(bench: Bench, keep: list[str]) -> None:
    """Remove the bench's own images: the small cells on both sides always; the selected cell's (bench/ and
    bench-naive/) only with BENCH_CLEAN=1, so that the next default run needs no cold build on either side."""
    if os.environ.get("BENCH_CLEAN") == "1":
        keep = []
    for image in bench.client.images.list(filters={"label": NAIVE_LABEL}):
        if not any(f"{REPOSITORY}-naive/{t.split('/', 1)[1]}" in image.tags for t in keep):
            bench.client.images.remove(image.id, force=True)
    subprocess.run([sys.executable, "-m", "builder", "--matrix", str(bench.small), "clean"], cwd=ROOT,
                   capture_output=True)
    if not keep:
        subprocess.run([sys.executable, "-m", "builder", "--matrix", str(bench.matrix), "clean", "--only",
                        "*"], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
