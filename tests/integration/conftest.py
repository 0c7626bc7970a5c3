"""Integration fixtures: a real Docker engine, a test copy of the matrix, and clean-up by label."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.engine import MANAGED, TAG, Engine
from builder.errors import EngineError
from builder.state import State

ROOT = Path(__file__).resolve().parents[2]
# Parallel test runs on one engine use different repositories so their images never collide.
REPOSITORY = os.environ.get("BUILDER_TEST_REPOSITORY", "builder-test")
TORCH = ["--framework", "torch==2.4.1", "--cuda", "12.1", "--python", "3.11"]
TF = ["--framework", "tensorflow==2.18.0", "--cuda", "12.5", "--python", "3.11"]
TORCH_TAG = f"{REPOSITORY}/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12"
SIBLING_TAG = f"{REPOSITORY}/torch:2.4.1-cuda12.1-cudnn9.1-py3.9-runtime-debian11"
TF_TAG = f"{REPOSITORY}/tensorflow:2.18.0-cuda12.5-cudnn9.3-py3.11-runtime-debian12"

pytestmark = pytest.mark.engine


@dataclass
class Work:
    root: Path
    matrix: Path
    state: Path
    cache: Path

    def cli(self, *args: str, matrix: Path | None = None, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "builder", "--matrix", str(matrix or self.matrix), *args]
        if args and args[0] in ("build", "certify"):
            cmd += ["--state", str(self.state)]
        if args and args[0] == "build" and "--cache-dir" not in args:
            cmd += ["--cache-dir", str(self.cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "CI": "1", **(env or {})}, timeout=1800)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        return proc

    @property
    def store(self) -> State:
        """The state directory the CLI writes, read through the same API as every stage."""
        return State(self.state)

    def record(self, tag: str) -> dict:
        record = self.store.read_record(tag)
        assert record is not None, f"no build record for {tag} in {self.state}"
        return record

    def certificate(self, tag: str) -> dict:
        cert = self.store.read_certificate(tag)
        assert cert is not None, f"no certificate for {tag} in {self.state}"
        return cert


def interrupt_when(work: Work, args: list[str], ready, what: str, timeout: float = 600) -> tuple[int, str]:
    """Start `builder ARGS`, send it SIGINT once `ready()` is true, and return its exit code and stderr."""
    cmd = [sys.executable, "-m", "builder", "--matrix", str(work.matrix), *args, "--state", str(work.state)]
    # A shell that starts jobs in the background hands them SIGINT ignored, and Python then keeps it ignored:
    # the child gets the default back, as from a terminal, or the interrupt would never arrive.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CI": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"`builder {' '.join(args)}` never reached {what}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def managed_containers(engine: Engine) -> list[dict]:
    return list(engine.api.containers(all=True, filters={"label": MANAGED}))


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return Engine.connect()
    except EngineError as exc:
        if os.environ.get("BUILDER_REQUIRE_ENGINE"):
            pytest.fail(str(exc))
        pytest.skip(f"no engine: {exc}")


@pytest.fixture(scope="session")
def work(tmp_path_factory, engine) -> Work:
    root = tmp_path_factory.mktemp("builder-it")
    text = (ROOT / "matrix.yaml").read_text().replace("repository: builder\n", f"repository: {REPOSITORY}\n", 1)
    assert f"repository: {REPOSITORY}" in text
    (root / "matrix.yaml").write_text(text)
    yield Work(root=root, matrix=root / "matrix.yaml", state=root / "state", cache=root / "cache")
    # Remove what the tests made, by label: every image tagged into the test repository.
    for info in engine.images_with_label(TAG, all_images=True):
        if info.labels.get(TAG, "").startswith(f"{REPOSITORY}/"):
            engine.remove_images_with_label(TAG, info.labels[TAG])
    engine.remove_containers(MANAGED, running=False)  # running ones belong to another run still under way
    engine.prune_dangling(MANAGED)
    # And the session's package cache (gigabytes: each wheel and its stored copy). pytest keeps its last three
    # temporary roots, and the disk outlives a CI run on these machines; the state's logs and records stay.
    shutil.rmtree(root / "cache", ignore_errors=True)


@pytest.fixture(scope="session")
def torch_built(work) -> dict:
    """The real torch 2.4.1 / CUDA 12.1 / Python 3.11 cell, built now (--force: an existing image is no proof;
    --no-cache: nor are the layers an earlier `make images` or bench left in the engine's cache)."""
    proc = work.cli("build", *TORCH, "--force", "--no-cache", check=True)
    assert "built" in proc.stdout, proc.stdout
    return work.record(TORCH_TAG)
