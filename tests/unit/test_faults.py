"""Faults without a real engine: the claim names, which runs are dead (their leftovers safe to remove), and what
build and certify do when another run holds the work, when the engine dies under them, and when its disk fills.

The real engine's side (SIGKILL of a private dockerd, two processes, a full tmpfs) is tests/integration/test_faults.py.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path

import pytest

from builder import engine as engine_mod
from builder.build import BuildOptions, build_cells
from builder.certify import CertifyOptions, certify_cells
from builder.engine import (
    CLAIM_PREFIX,
    HASH,
    LEASE_GRACE_S,
    LEASE_PREFIX,
    OWNER,
    TAG,
    claim_name,
    full,
    gone,
    lease_alive,
    live_owners,
    stale,
)
from builder.errors import EngineGone
from builder.render import render
from builder.sources import Sources
from builder.state import State
from builder.verdict import reason, summarize

from .fakes import FakeEngine, Payload
from .golden import cell

CPU_CELL = cell("torch-2.4.1-cpu-py3.11")
CUDA_CELL = cell("torch-2.4.1-cuda12.1-py3.11")
HASH_A = "a" * 64
NOW = 1_800_000_000.0
# Docker's rule for container names
CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


# ------------------------------------------------------------------------------------------ claim names
def test_a_claim_name_is_one_per_kind_and_content_and_a_valid_container_name():
    names = {claim_name(kind, key) for kind in ("build", "certify") for key in (HASH_A, "sha256:" + "b" * 64)}
    assert len(names) == 4
    assert all(CONTAINER_NAME.fullmatch(n) and n.startswith(CLAIM_PREFIX) and len(n) < 64 for n in names)
    assert claim_name("build", HASH_A) == claim_name("build", "sha256:" + HASH_A)  # one content, one name


@pytest.mark.parametrize("kind, key", [("push", HASH_A), ("build", "../etc"), ("build", "ABC"), ("build", "a" * 8)])
def test_no_claim_name_for_an_unknown_kind_or_a_key_that_is_not_a_digest(kind, key):
    with pytest.raises(ValueError):
        claim_name(kind, key)


# --------------------------------------------------------------------------------------- who is dead
def listed(name: str, owner: str | None, state: str, created: float = NOW - 10, **labels: str) -> dict:
    """A container as the engine's listing gives it."""
    return {"Id": name + "-id", "Names": [f"/{name}"], "State": state, "Created": created,
            "Labels": {**({OWNER: owner} if owner else {}), **labels}}


@pytest.mark.parametrize("state, age, alive", [
    ("running", 10, True), ("paused", 10, True), ("restarting", 10, True),
    ("created", 5, True),  # its process is between create and start
    ("created", LEASE_GRACE_S + 1, False),  # its process died between the two
    ("exited", 1, False), ("dead", 1, False),  # the process that held its stdin died, or the engine restarted
])
def test_a_lease_is_alive_while_it_runs(state, age, alive):
    assert lease_alive(state, NOW - age, NOW) is alive


def test_only_the_containers_of_owners_without_a_live_lease_are_stale():
    containers = [
        listed(f"{LEASE_PREFIX}live", "live", "running"),
        listed(f"{CLAIM_PREFIX}build-{'1' * 40}", "live", "created"),
        listed("run-of-live", "live", "running"),
        listed(f"{LEASE_PREFIX}dead", "dead", "exited"),
        listed(f"{CLAIM_PREFIX}build-{'2' * 40}", "dead", "created"),
        listed("run-of-dead", "dead", "exited"),
        listed("no-lease-at-all", "orphan", "created"),  # an owner whose lease is gone altogether
        listed("someone-elses", None, "exited"),  # no owner label: not ours to judge, never removed
        listed("named-like-a-lease-but-not", "fake", "running"),  # a running container is no lease by itself
    ]
    assert live_owners(containers, NOW) == {"live"}
    names = sorted(c["Names"][0] for c in stale(containers, NOW))
    assert names == sorted([f"/{LEASE_PREFIX}dead", f"/{CLAIM_PREFIX}build-{'2' * 40}", "/run-of-dead",
                            "/no-lease-at-all", "/named-like-a-lease-but-not"])
    # this process's own containers are never stale to itself (its lease may be starting)
    assert not any(c["Labels"].get(OWNER) == "orphan" for c in stale(containers, NOW, keep="orphan"))


# ------------------------------------------------------------------------------------ the one lines
def test_the_engine_lines_say_what_happened_and_what_to_do():
    line = gone("tcp://10.0.0.2:2375", "the build")
    assert "tcp://10.0.0.2:2375 stopped answering during the build" in line and "start it again and rerun" in line
    assert "removed by the next build or certify" in line and "\n" not in line
    line = full("unix:///var/run/docker.sock", "/var/lib/docker", "the build")
    assert "no space left on device in its data root /var/lib/docker" in line and "builder clean" in line
    assert "\n" not in line


# -------------------------------------------------------------------------- build under a held claim
def build_opts(tmp_path: Path, **kw) -> BuildOptions:
    return BuildOptions(state_dir=tmp_path / "state", sources=Sources(proxy=False, cache_dir=tmp_path / "c"),
                        keep_cache=True, **kw)


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(engine_mod, "CLAIM_POLL_S", 0.02)


def other_run_builds(engine: FakeEngine, c, after: float = 0.3, succeeds: bool = True) -> threading.Thread:
    """Another process holds the build claim on `c`; after `after` s it has built it (or failed) and lets go."""
    base = engine.image(c.base.image) or engine.add_image(c.base.image)
    name = claim_name("build", render(c, base_id=base.id).content_hash)
    engine.claims[name] = "host other, pid 2"

    def finish() -> None:
        time.sleep(after)
        if succeeds:
            engine.add_image(c.tag, {HASH: render(c, base_id=base.id).content_hash, TAG: c.tag})
        del engine.claims[name]

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


@pytest.mark.parametrize("force", [False, True])
def test_a_build_held_by_another_run_waits_and_takes_its_image(tmp_path, caplog, force):
    engine = FakeEngine()
    engine.add_image(CPU_CELL.base.image)
    if force:  # an older image of the same content is there: --force rebuilds it, unless another run just did
        engine.add_image(None, {HASH: render(CPU_CELL, base_id=engine.image(CPU_CELL.base.image).id).content_hash})
    other = other_run_builds(engine, CPU_CELL)
    caplog.set_level("INFO", logger="builder")
    [result] = build_cells(engine, [CPU_CELL], build_opts(tmp_path, force=force))
    other.join()
    assert result.status == "up to date" and result.image_id == engine.image(CPU_CELL.tag).id
    assert ("build", CPU_CELL.tag) not in engine.calls  # the work was not done twice
    assert State(tmp_path / "state").read_record(CPU_CELL.tag) is None  # nor recorded twice
    assert not result.log_path.exists()  # the other run's log (same state dir) is not overwritten either
    text = caplog.text
    assert "another run (host other, pid 2) is doing the build of the same content: waiting" in text
    assert "built by another run meanwhile" in text
    assert engine.claims == {} and engine.leases_ended == 1 and engine.sweeps == 1


def test_a_build_held_by_a_run_that_then_fails_is_built_here(tmp_path):
    engine = FakeEngine()
    engine.add_image(CPU_CELL.base.image)
    other = other_run_builds(engine, CPU_CELL, succeeds=False)
    [result] = build_cells(engine, [CPU_CELL], build_opts(tmp_path))
    other.join()
    assert result.status == "built" and ("build", CPU_CELL.tag) in engine.calls
    assert engine.claims == {}  # released after the build


def test_a_build_notes_in_its_claim_what_it_made_for_the_sweep(tmp_path):
    engine = FakeEngine()
    engine.add_image(CPU_CELL.base.image)
    held = {}
    engine.on_build = lambda tag, stop: held.update(engine.claims)
    build_cells(engine, [CPU_CELL], build_opts(tmp_path))
    [name] = held
    containers, images = engine.made[name]
    assert len(containers) == 1 and len(images) == 1  # the step container and the builder stage the log named
    assert held[name] == engine.who and engine.claims == {}


# ------------------------------------------------------------------------------- the engine dies
def test_an_engine_that_dies_mid_build_is_one_line_and_the_rest_is_skipped(tmp_path):
    def die(tag, stop):
        raise EngineGone(gone("fake://engine", "the build"))

    engine = FakeEngine(on_build=die, docker_info={"DockerRootDir": "/var/lib/docker"})
    engine.add_image(CPU_CELL.base.image)
    results = build_cells(engine, [CPU_CELL, CUDA_CELL], dataclasses.replace(build_opts(tmp_path), keep_cache=False))
    assert [r.status for r in results] == ["failed", "skipped"]
    assert results[0].error.startswith("the engine at fake://engine stopped answering during the build")
    assert results[1].error is None  # one line for the fault, not one per cell
    assert results[0].log_path.read_text().startswith("Step 1/2")  # the log so far is kept
    assert [c for c in engine.calls if c[0] == "build"] == [("build", CPU_CELL.tag)]
    assert engine.claims == {} and engine.leases_ended == 1


def test_a_full_disk_is_named_with_the_engines_data_root(tmp_path):
    engine = FakeEngine(failing_builds={CPU_CELL.tag: "write /var/lib/docker/overlay2/x/diff/y: no space left on device"},
                        docker_info={"DockerRootDir": "/srv/docker"})
    engine.add_image(CPU_CELL.base.image)
    [result] = build_cells(engine, [CPU_CELL], build_opts(tmp_path))
    assert result.status == "failed"
    assert result.error.startswith("the engine at fake://engine ran out of disk space during the build")
    assert "no space left on device in its data root /srv/docker" in result.error and "rerun" in result.error
    assert result.log_tail and result.log_path.exists()


def test_an_engine_that_dies_mid_certify_keeps_the_old_certificate(tmp_path):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result={
        "schema": 1, "checks": [{"name": "train.cpu.mlp", "status": "pass", "detail": "ok", "values": {}}],
        "inventory": {"gpus": []}}))
    base = engine.add_image(CPU_CELL.base.image)
    engine.add_image(CPU_CELL.tag, {HASH: render(CPU_CELL, base_id=base.id).content_hash, TAG: CPU_CELL.tag})
    options = CertifyOptions(state_dir=tmp_path / "state", lock_dir=tmp_path)
    [first] = certify_cells(engine, [CPU_CELL], options)
    state = State(tmp_path / "state")
    before = (state.certificate_path(CPU_CELL.tag).read_bytes(), state.index_path.read_bytes())

    def die(image, stop):
        raise EngineGone(gone("fake://engine", "a run of the image"))

    engine.on_run = die
    results = certify_cells(engine, [CPU_CELL, CUDA_CELL], dataclasses.replace(options, force=True))
    assert [r.level for r in results] == ["failed", "skipped"]
    assert "stopped answering" in results[0].summary and first.level == "cpu-verified"
    assert (state.certificate_path(CPU_CELL.tag).read_bytes(), state.index_path.read_bytes()) == before
    assert engine.claims == {}


# --------------------------------------------------------------------------------- the certify summary
def test_a_skip_reason_is_shown_whole_not_cut_at_40_characters():
    detail = "no C/C++ compiler in the image, which torch.compile (inductor) needs: install g++ in a devel image"
    text = summarize([{"status": "pass"}, {"status": "skip", "detail": detail}, {"status": "skip", "detail": "one GPU"}])
    # was "(no C/C++ compiler in the image, which to; one GPU)"
    assert text == "1 passed, 2 skipped (no C/C++ compiler in the image, which torch.compile (inductor) needs; one GPU)"


def test_a_very_long_skip_reason_is_cut_at_a_word_boundary():
    words = "the framework reported a reason far longer than any summary line should carry in one go, " * 2
    short = reason(words)
    assert short.endswith(" ...") and len(short) <= 84
    assert words.startswith(short[:-4]) and words[len(short) - 4] == " "  # whole words only


# ------------------------------------------------------------------- two runs through one engine's claims
def two_runs_on_one_engine(**kw) -> tuple[FakeEngine, FakeEngine]:
    """Two processes' views of one engine: the same images, tags and claims; each its own owner."""
    a = FakeEngine(who="host a, pid 1", **kw)
    b = FakeEngine(who="host b, pid 2", images=a.images, refs=a.refs, claims=a.claims, lock=a.lock, **kw)
    return a, b


def test_a_certify_run_that_waited_takes_the_other_runs_certificate(tmp_path):
    payload = {"schema": 1, "checks": [{"name": "train.cpu.mlp", "status": "pass", "detail": "ok", "values": {}}],
               "inventory": {"gpus": []}}
    a, b = two_runs_on_one_engine(payload=lambda image, cmd, gpus: Payload(result=payload))
    base = a.add_image(CPU_CELL.base.image)
    a.add_image(CPU_CELL.tag, {HASH: render(CPU_CELL, base_id=base.id).content_hash, TAG: CPU_CELL.tag})
    a.on_run = lambda image, stop: time.sleep(0.5)  # a is certifying while b starts
    options = CertifyOptions(state_dir=tmp_path / "state", lock_dir=tmp_path)
    first: list = []
    thread = threading.Thread(target=lambda: first.extend(certify_cells(a, [CPU_CELL], options)))
    thread.start()
    while not a.runs:
        time.sleep(0.01)
    [second] = certify_cells(b, [CPU_CELL], dataclasses.replace(options, force=True))  # even --force takes it
    thread.join()
    assert first[0].level == second.level == "cpu-verified"
    assert len(a.runs) == 1 and b.runs == []  # the payload ran once
    assert second.current and second.summary.endswith("(certified by another run)")
    cert = State(tmp_path / "state").read_certificate(CPU_CELL.tag)
    assert State(tmp_path / "state").index()[CPU_CELL.tag].digest == cert["digest"]
    assert a.claims == {}


def test_a_client_gone_mid_reply_is_no_traceback_from_the_package_proxy(capsys):
    """pip stopped by a full disk leaves the proxy writing to a closed socket: socketserver printed a traceback."""
    from http.server import BaseHTTPRequestHandler

    from builder.sources import _Server

    server = _Server(("127.0.0.1", 0), BaseHTTPRequestHandler)
    try:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            server.handle_error(None, ("127.0.0.1", 1))
    finally:
        server.server_close()
    assert "Traceback" not in capsys.readouterr().err


def test_labels_follow_the_last_instruction_and_never_join_it():
    """The build's labels are one LABEL line after the Dockerfile's last instruction. Appended after a line that
    continues (a trailing backslash), the builder would read them as that instruction's words and the image
    would silently lack them: that is refused."""
    from builder.errors import BuildFailed

    labels = {"org.builder.hash": "abc", "org.test": 'say "$HOME" \\ once\nagain'}
    got = engine_mod.with_labels(b'FROM x\nCMD ["true"]', labels)
    assert got == b'FROM x\nCMD ["true"]\nLABEL "org.builder.hash"="abc" "org.test"="say \\"\\$HOME\\" \\\\ once again"\n'
    assert engine_mod.with_labels(b"FROM x\n", {}) == b"FROM x\n"
    for ending in (b"RUN true \\\n", b"RUN true \\  \n", b"RUN true \\\r\n"):
        with pytest.raises(BuildFailed, match="continued instruction"):
            engine_mod.with_labels(b"FROM x\n" + ending, labels)
