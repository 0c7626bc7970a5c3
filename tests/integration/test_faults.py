"""Faults on a real engine: dockerd killed mid-build and mid-certify, two builder processes on one selection and one
engine, and a disk that fills during a build. Each must give one clear line, keep the log, leave no container or
image of the tool's behind (a run that died is cleaned up by the next one) and lose nothing made before.

Every fault is injected into a private dockerd in a network namespace of its own (private_engine.py), reached over
tcp:// as a remote engine is, never into the engine the other tests use. The base goes in from the main engine
(docker save | load through the SDK, seconds) instead of a debootstrap. The TensorFlow CPU cell is the smallest real
image (1.5 GB): one engine is shared by the module's tests, which run in file order on purpose (the crash's leftovers
are what the two concurrent builds must sweep; their image is what certify then runs), so it is built once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from builder.bases import ensure_base
from builder.engine import LEASE_PREFIX, MANAGED, OWNER, SESSION, Engine
from builder.matrix import Selection, expand, load_matrix
from builder.state import State

from .conftest import REPOSITORY, ROOT
from .private_engine import NamespacedEngine, missing

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TF_CPU = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
TF_CPU_TAG = f"{REPOSITORY}/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
TIMES: dict[str, float] = {}  # wall time of each fault, printed at the end of the module (pytest -s shows it)


class Site:
    """A private engine, the CLI pointed at it, and one state directory and package cache for the module."""

    def __init__(self, private: NamespacedEngine, root: Path) -> None:
        self.private = private
        self.root = root
        self.matrix = root / "matrix.yaml"
        self.matrix.write_text((ROOT / "matrix.yaml").read_text().replace("repository: builder\n",
                                                                          f"repository: {REPOSITORY}\n", 1))
        self.state = root / "state"

    @property
    def engine(self) -> Engine:
        return Engine(docker.DockerClient(base_url=self.private.address, timeout=120), self.private.address)

    def command(self, *args: str) -> list[str]:
        extra = ["--state", str(self.state)] + (["--cache-dir", str(self.root / "cache")] if args[0] == "build" else [])
        return [sys.executable, "-m", "builder", "--matrix", str(self.matrix), *args, *extra]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "CI": "1", "DOCKER_HOST": self.private.address}
        env.pop("DOCKER_CONTEXT", None)
        return env

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*args), cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=1800)

    def kill_when(self, proc: subprocess.Popen[str], ready: Callable[[], bool], what: str,
                  timeout: float = 900) -> tuple[str, str, float]:
        """SIGKILL the private dockerd once `ready()`; return the builder's stdout, stderr and seconds to exit."""
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"never reached {what} (exit {proc.returncode}):\n{out}\n{err[-3000:]}")
            time.sleep(0.3)
        self.private.stop()
        killed = time.monotonic()
        out, err = proc.communicate(timeout=300)  # a dead engine must not hang the run
        return out, err, time.monotonic() - killed

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Every container on the private engine, and every image but the tagged ones (nobody else uses it)."""
        api = self.engine.api
        containers = [f"{c['Names'][0]} {c['State']}" for c in api.containers(all=True)]
        untagged = [i["Id"][7:19] for i in api.images(all=True) if not any(t != "<none>:<none>"
                                                                              for t in i.get("RepoTags") or [])]
        return containers, untagged


def base_image() -> str:
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"), Selection(framework=("tensorflow==2.18.0",), cuda=("cpu",),
                                                                   python=("3.11",)))
    return cells[0].base.image


def load_base(main: Engine, into: NamespacedEngine) -> None:
    """The cell's base from the main engine (made there by `base` if it is not yet): save | load, by name."""
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"), Selection(framework=("tensorflow==2.18.0",), cuda=("cpu",),
                                                                   python=("3.11",)))
    ensure_base(main, cells[0].base)
    client = docker.DockerClient(base_url=into.address, timeout=600)
    client.api.load_image(main.save(cells[0].base.image))
    assert client.api.inspect_image(cells[0].base.image)["Id"] == main.image(cells[0].base.image).id


def errors(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def site(engine, tmp_path_factory) -> Iterator[Site]:
    reason = missing()
    if reason:
        pytest.skip(f"no private engine in a network namespace: {reason}")
    private = NamespacedEngine.start()
    root = tmp_path_factory.mktemp("faults")
    try:
        load_base(engine, private)
        yield Site(private, root)
    finally:
        private.close()
        shutil.rmtree(root / "cache", ignore_errors=True)  # 1.6 GB; pytest keeps its last three roots
        print("fault wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMES.items()))


# -------------------------------------------------------------------------------- dockerd killed mid-build
def test_engine_killed_mid_build_is_one_line_and_the_next_run_removes_what_it_left(site):
    started = time.monotonic()
    log = State(site.state).log_path(TF_CPU_TAG)
    build = site.start("build", *TF_CPU)
    # uv's "Resolved N packages" comes right before it downloads and unpacks them
    _, err, to_exit = site.kill_when(build, lambda: log.exists() and "Resolved " in log.read_text(),
                                     "the install starting in the build")
    assert build.returncode == 1, err[-3000:]
    assert to_exit < 30, to_exit  # the run noticed at once, it did not wait for a stream that will never end
    [line] = errors(err)
    assert line.startswith(f"error: {TF_CPU_TAG}: build failed: the engine at {site.private.address} stopped "
                           "answering during the build"), line
    assert "start it again and rerun" in line and "removed by the next build or certify there" in line
    assert "Resolved " in log.read_text()  # the log so far is kept, and named
    assert f"whole log: {log}" in err
    assert State(site.state).read_record(TF_CPU_TAG) is None

    site.private.restart()
    containers, untagged = site.leftovers()
    # What the crash left: this run's lease and claim, its pip step container and the layers it committed so far.
    assert any(c.startswith(f"/{LEASE_PREFIX}") for c in containers) and len(containers) >= 3, containers
    assert untagged, "the build committed no layer before pip: nothing to prove the sweep on"
    # The next run on that engine (here a certify, which has nothing to run) finds and removes them.
    nxt = site.run("certify", *TF_CPU)
    assert re.search(rf"removed {len(containers)} container\(s\) and [1-9][0-9]* image\(s\) left on "
                     rf"{re.escape(site.private.address)} by a run that stopped \(host [^,]+, pid {build.pid}\)",
                     nxt.stderr), nxt.stderr[-2000:]
    assert site.leftovers() == ([], [])
    assert site.engine.image(base_image()) is not None  # the base it built on is untouched
    TIMES["killed mid-build"] = time.monotonic() - started


# ---------------------------------------------------------------------- two builder processes, one engine
def test_two_builds_of_one_selection_on_one_remote_engine_build_it_once(site):
    started = time.monotonic()
    first = site.start("build", *TF_CPU)
    time.sleep(1)  # the second starts while the first holds the claim (it takes one within seconds)
    second = site.start("build", *TF_CPU)
    runs = [(p, *p.communicate(timeout=1800)) for p in (first, second)]
    for proc, out, err in runs:
        assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
        assert errors(err) == []
    rows = [next(line for line in out.splitlines() if line.startswith(TF_CPU_TAG)) for _, out, _ in runs]
    built = [i for i, row in enumerate(rows) if " built " in row]
    assert len(built) == 1, rows  # one of them built it ...
    waited = runs[1 - built[0]]
    assert " up to date " in rows[1 - built[0]]  # ... the other waited, and took that image
    assert "is doing the build of the same content: waiting for it" in waited[2]
    assert "built by another run meanwhile" in waited[2] and "Step 1/" not in waited[2]
    # One record and one log, both whole (the waiting run wrote neither), of the image the engine has.
    record = State(site.state).read_record(TF_CPU_TAG)
    image = site.engine.image(TF_CPU_TAG)
    assert record is not None and image is not None and record["image_id"] == image.id
    assert json.loads(State(site.state).record_path(TF_CPU_TAG).read_text())["image_id"] == image.id
    assert State(site.state).log_path(TF_CPU_TAG).read_text().count("Step 1/") == 1
    assert site.leftovers()[0] == []  # no claim, lease or step container
    assert not site.engine.api.images(filters={"dangling": True, "label": MANAGED})  # nor a builder stage
    TIMES["two builds at once"] = time.monotonic() - started


# ------------------------------------------------------------------------------ dockerd killed mid-certify
def test_two_certify_runs_certify_once_and_a_kill_mid_certify_keeps_the_certificate(site):
    started = time.monotonic()
    first, second = site.start("certify", *TF_CPU), None
    time.sleep(1)
    second = site.start("certify", *TF_CPU)
    runs = [(p, *p.communicate(timeout=1800)) for p in (first, second)]
    for proc, out, err in runs:
        assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
    ran = [err for _, _, err in runs if "cpu-verified in" in err and "certified by another run" not in err]
    took = [err for _, _, err in runs if "(certified by another run)" in err]
    assert len(ran) == 1 and len(took) == 1, [err[-1500:] for _, _, err in runs]
    state = State(site.state)
    kept = {p: p.read_bytes() for p in (state.certificate_path(TF_CPU_TAG), state.index_path,
                                        state.log_path(TF_CPU_TAG, "certify"))}
    stamped = site.engine.image(TF_CPU_TAG)
    TIMES["two certify runs at once"] = time.monotonic() - started

    started = time.monotonic()
    api = site.engine.api
    forced = site.start("certify", *TF_CPU, "--force")
    seen: list[float] = []

    def payload_running() -> bool:  # the payload container has been running a few seconds (TensorFlow importing)
        if api.containers(filters={"label": SESSION, "status": "running"}):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 3

    _, err, to_exit = site.kill_when(forced, payload_running, "the payload running")
    assert forced.returncode == 1 and to_exit < 30, (forced.returncode, to_exit, err[-2000:])
    assert errors(err) == []
    [line] = [ln for ln in err.splitlines() if ln.startswith(f"{TF_CPU_TAG}: failed")]
    assert f"the engine at {site.private.address} stopped answering during a run of" in line, line
    assert "start it again and rerun" in line
    assert {p: p.read_bytes() for p in kept} == kept  # the certificate, the index and its log: as they were

    site.private.restart()
    containers, _ = site.leftovers()
    assert containers, "the crash left nothing: nothing to prove the sweep on"
    assert all(f"{OWNER}" in c.get("Labels", {}) for c in site.engine.api.containers(all=True))
    again = site.run("certify", *TF_CPU)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "by a run that stopped" in again.stderr and f"pid {forced.pid})" in again.stderr
    assert "current:" in again.stderr  # the old certificate still stands for the untouched image and stamp
    assert site.engine.image(TF_CPU_TAG).id == stamped.id
    assert site.leftovers()[0] == []
    TIMES["killed mid-certify"] = time.monotonic() - started


# ---------------------------------------------------------------------------------- the disk fills up
@pytest.fixture(scope="module")
def small(engine) -> Iterator[NamespacedEngine]:
    reason = missing()
    if reason:
        pytest.skip(f"no private engine in a network namespace: {reason}")
    private = NamespacedEngine.start(data_size="400m")  # the base and Python fit (~170 MB); pip's wheels do not
    try:
        load_base(engine, private)
        yield private
    finally:
        private.close()


def test_a_disk_that_fills_during_a_build_is_one_line_and_leaves_nothing(small, tmp_path):
    started = time.monotonic()
    site = Site(small, tmp_path)
    proc = site.run("build", *TF_CPU)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = errors(proc.stderr)
    assert line.startswith(f"error: {TF_CPU_TAG}: build failed: the engine at {small.address} ran out of disk "
                           "space during the build (no space left on device in its data root "
                           f"{small.root / 'data'})"), line
    assert "free space there" in line and "larger data root" in line
    log = State(tmp_path / "state").log_path(TF_CPU_TAG)
    assert "no space left on device" in log.read_text().lower()  # the log, with the engine's own words, is kept
    assert site.leftovers() == ([], [])  # no step container, no builder stage, no claim or lease
    assert site.engine.image(base_image()) is not None  # what was there before is untouched
    TIMES["disk full"] = time.monotonic() - started


# ------------------------------------------------------------------ the claim itself, on the main engine
CLAIMER = """
import json, logging, sys, time
from builder.engine import Claim, Engine
logging.basicConfig(level=logging.INFO, format="%(message)s")
engine = Engine.connect()
start, key, image, hold = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
got = engine.claim("build", key, "faults/claim:test", image)
print(json.dumps({"claimed": isinstance(got, Claim), "who": getattr(got, "who", None), "owner": engine._owner}),
      flush=True)
if isinstance(got, Claim):  # the loser does not wait here: it only had to be told
    time.sleep(hold)
    engine.release(got)
engine.end_lease()
"""


def test_a_claim_is_atomic_between_two_processes_and_taken_over_from_one_killed(engine):
    """Two processes ask for the same claim in the same instant through the main engine's socket: exactly one
    gets it. The holder is then SIGKILLed while holding it: the next asker clears its claim and lease and takes
    over. No image is built: the claim is a created container, cheap enough for the main engine."""
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"), Selection(framework=("tensorflow==2.18.0",), cuda=("cpu",),
                                                                   python=("3.11",)))
    image, _ = ensure_base(engine, cells[0].base)
    started = time.monotonic()
    key = os.urandom(32).hex()  # a content no real build has
    at = time.time() + 3  # both interpreters are up and connected by then

    def claimer(hold: float) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", CLAIMER, str(at), key, image, str(hold)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    racers = [claimer(60), claimer(60)]
    lines = [p.stdout.readline() for p in racers]
    if not all(lines):
        for p in racers:
            p.kill()
        pytest.fail("a claimer printed nothing: " + " | ".join(p.communicate()[1][-1500:] for p in racers))
    answers = [json.loads(line) for line in lines]
    assert sorted(a["claimed"] for a in answers) == [False, True], answers
    holder = racers[[a["claimed"] for a in answers].index(True)]
    loser = answers[[a["claimed"] for a in answers].index(False)]
    assert loser["who"].endswith(f"pid {holder.pid}")  # the loser is told who holds it
    holder.kill()  # SIGKILL: no release, no end of lease; the engine ends its lease when its stdin closes
    holder.wait()
    racers[1 - racers.index(holder)].communicate(timeout=60)
    at = time.time()
    after = claimer(0)
    out, err = after.communicate(timeout=120)
    taken = json.loads(out.splitlines()[0])
    assert taken["claimed"] is True, err
    assert f"clearing the claim of a run that stopped (host {os.uname().nodename}, pid {holder.pid})" in err
    ours = {a["owner"] for a in [*answers, taken]}
    left = [c["Names"][0] for c in engine.api.containers(all=True, filters={"label": OWNER})
            if c["Labels"].get(OWNER) in ours]
    assert left == [], left  # nothing of the three processes is left on the engine
    print(f"claim race and take-over on the main engine: {time.monotonic() - started:.0f} s")
