"""build, certify and bases driven through the in-memory engine: skipping, fail-fast, interrupts, base fallback,
the tested image, and every certify decision, without a 5 GB build."""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from builder import certify as certify_mod
from builder.bases import ensure_base, slim
from builder.build import BuildOptions, build_cells
from builder.certify import (
    CertifyOptions,
    certify_cells,
    current_hash,
    find_tested_image,
)
from builder.engine import CERT_DIGEST, HASH, LEVEL, TAG
from builder.errors import BaseImageError, Interrupted
from builder.gpu import DriverProbe
from builder.render import render
from builder.sources import Sources
from builder.state import State
from builder.verdict import MULTI_GPU_CHECKS, REQUIRED_GPU_CHECKS

from .fakes import FakeEngine, Payload
from .golden import cell

CUDA_CELL = cell("torch-2.4.1-cuda12.1-py3.11")
CPU_CELL = cell("torch-2.4.1-cpu-py3.11")
H200 = DriverProbe(version="550.54.14", gpus=("NVIDIA H200",), error=None, source="nvidia-smi in a container")
NO_GPU = DriverProbe(version=None, gpus=(), error="nvidia-smi exited 127: sh: 1: nvidia-smi: not found",
                     source="nvidia-smi in a container")


def cpu_checks() -> list[dict]:
    names = ["claims.python", "claims.framework", "claims.cuda", "claims.cudnn", "train.cpu.mlp", "train.cpu.conv",
             "checkpoint"]
    return [{"name": n, "status": "pass", "detail": f"{n} ok", "values": {}} for n in names]


def gpu_checks(status: str = "pass", *names: str) -> list[dict]:
    return [{"name": n, "status": status, "detail": f"{n} {status}", "values": {}}
            for n in (names or REQUIRED_GPU_CHECKS)]


def result(checks: list[dict], gpus: int = 0) -> dict:
    return {"schema": 1, "checks": checks, "ok": all(c["status"] != "fail" for c in checks),
            "inventory": {"gpus": [{"name": "NVIDIA H200", "capability": "9.0"}] * gpus, "driver": None}}


def built(engine: FakeEngine, c=CUDA_CELL) -> str:
    """Put the cell's base and its tested image into the engine, as `build` leaves them."""
    base = engine.image(c.base.image) or engine.add_image(c.base.image)
    content = render(c, base_id=base.id).content_hash
    return engine.add_image(c.tag, {HASH: content, TAG: c.tag}).id


def opts(tmp_path: Path, **kw) -> CertifyOptions:
    return CertifyOptions(state_dir=tmp_path / "state", lock_dir=tmp_path, **kw)


def certify(engine: FakeEngine, tmp_path: Path, c=CUDA_CELL, **kw):
    [res] = certify_cells(engine, [c], opts(tmp_path, **kw))
    return res, State(tmp_path / "state").read_certificate(c.tag)


# ------------------------------------------------------------------------------------------ certify
def test_cpu_host_certifies_cpu_verified_with_the_payload_brought_in(tmp_path):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result=result([*cpu_checks(), {"name": "gpu", "status": "skip", "detail": "GPU checks switched off (--gpu off)", "values": {}}])))
    image_id = built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "cpu-verified" and res.ok and not res.current
    [run] = engine.runs
    assert run["gpus"] is None and run["command"][-2:] == ["--gpu", "off"]
    assert "/opt/builder/smoke/payload.py" in run["inject"]  # the current payload, not one baked in
    assert cert["payload"]["digest"] == certify_mod.payload_digest(run["inject"])
    assert cert["image"]["id"] == image_id and cert["host"]["gpus_requested"] is None
    stamped = engine.image(CUDA_CELL.tag)
    assert stamped.parent == image_id and stamped.labels[CERT_DIGEST] == cert["digest"]
    assert stamped.labels[LEVEL] == "cpu-verified"
    # the payload's 7, and certify's own look at every home through the engine (promise.credentials.all_homes)
    assert "8 passed, 1 skipped (GPU checks switched off (--gpu off))" in res.summary
    assert State(tmp_path / "state").index()[CUDA_CELL.tag].digest == cert["digest"]
    assert engine.containers == set()


def test_a_current_certificate_is_not_run_again_but_force_and_a_new_payload_do(tmp_path, monkeypatch):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks())))
    built(engine)
    _, cert = certify(engine, tmp_path)
    again, same = certify(engine, tmp_path)
    assert again.current and again.level == "cpu-verified" and len(engine.runs) == 1 and same == cert
    forced, _ = certify(engine, tmp_path, force=True)
    assert not forced.current and len(engine.runs) == 2
    files = certify_mod.payload_files()
    newer = {**files, "/opt/builder/smoke/payload.py": files["/opt/builder/smoke/payload.py"] + b"\n# a new check\n"}
    monkeypatch.setattr(certify_mod, "payload_files", lambda: newer)
    stale, cert3 = certify(engine, tmp_path)
    assert not stale.current and len(engine.runs) == 3
    assert cert3["payload"]["digest"] == certify_mod.payload_digest(newer) != cert["payload"]["digest"]


def test_the_tested_image_is_found_under_its_stamp_and_without_its_tag(tmp_path):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks())))
    image_id = built(engine)
    certify(engine, tmp_path)
    content = current_hash(engine, CUDA_CELL)
    assert engine.image(CUDA_CELL.tag).id != image_id
    assert find_tested_image(engine, CUDA_CELL.tag, content) == image_id  # the stamp's parent
    engine.refs.pop(CUDA_CELL.tag)
    stamp = next(i for i in engine.images.values() if LEVEL in i.labels)
    del engine.images[stamp.id]
    assert find_tested_image(engine, CUDA_CELL.tag, content) == image_id  # untagged: the leaf with the hash


def test_a_base_that_moved_makes_the_image_not_built(tmp_path):
    engine = FakeEngine()
    built(engine)
    engine.add_image(CUDA_CELL.base.image)  # same tag, new image
    res, cert = certify(engine, tmp_path)
    assert res.level == "not built" and cert is None and engine.runs == []


def test_gpu_host_gets_gpu_certified_when_every_named_check_passes(tmp_path):
    engine = FakeEngine(docker_info={"Runtimes": {"runc": {}, "nvidia": {}}}, probe=H200,
                        payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks() + gpu_checks(), gpus=1)))
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "gpu-certified", cert["reasons"]
    [run] = engine.runs
    assert run["gpus"].count == -1 and run["command"][-4:] == ["--gpu", "require", "--expect-gpus", "1"]
    assert cert["host"]["driver"] == "550.54.14" and cert["host"]["gpu_paths"] == ["runtime"]
    assert (tmp_path / next(p.name for p in tmp_path.glob("builder-gpus-*.lock"))).exists()


@pytest.mark.parametrize("missing", REQUIRED_GPU_CHECKS)
def test_gpu_certified_needs_every_named_check(tmp_path, missing):
    checks = [c for c in gpu_checks() if c["name"] != missing] + gpu_checks("skip", missing)
    engine = FakeEngine(docker_info={"Runtimes": {"nvidia": {}}}, probe=H200,
                        payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks() + checks, gpus=1)))
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "failed"
    assert any(r.startswith(f"{missing}: GPUs were requested but it was skipped") for r in cert["reasons"])


def test_one_passing_gpu_check_is_not_enough(tmp_path):
    engine = FakeEngine(docker_info={"Runtimes": {"nvidia": {}}}, probe=H200, payload=lambda image, cmd, gpus: Payload(
        result=result(cpu_checks() + gpu_checks("pass", "gpu.matmul"), gpus=1)))
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "failed"
    assert "gpu.cudnn_conv: GPUs were requested but this check never ran" in cert["reasons"]


def test_two_gpus_also_need_the_collective(tmp_path):
    engine = FakeEngine(docker_info={"Runtimes": {"nvidia": {}}}, probe=H200,
                        payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks() + gpu_checks(), gpus=2)))
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "failed" and f"{MULTI_GPU_CHECKS[0]}: GPUs were requested but this check never ran" in \
        cert["reasons"]
    engine.payload = lambda image, cmd, gpus: Payload(result=result(
        cpu_checks() + gpu_checks() + gpu_checks("pass", *MULTI_GPU_CHECKS), gpus=2))
    res, _ = certify(engine, tmp_path, force=True, gpus="2")
    assert res.level == "gpu-certified"
    assert engine.runs[-1]["command"][-2:] == ["--expect-gpus", "2"] and engine.runs[-1]["gpus"].count == 2


def test_gpus_requested_but_not_seen_fails_naming_the_cause(tmp_path):
    seen = [{"name": "gpu.visible", "status": "fail", "detail": "GPUs were requested but TensorFlow sees none: "
             "NVIDIA_VISIBLE_DEVICES=all, driver: none", "values": {}}]
    logs = ("2026-11-29 W tensorflow/core/common_runtime/gpu/gpu_device.cc:2344] Cannot dlopen some GPU "
            "libraries.\nSkipping registering GPU devices...\n")
    engine = FakeEngine(docker_info={"Runtimes": {"nvidia": {}}}, probe=H200, payload=lambda image, cmd, gpus: Payload(
        exit_code=1, result=result(cpu_checks() + seen), logs=logs))
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "failed" and not res.ok
    assert cert["reasons"][0].startswith("gpu.visible: GPUs were requested but TensorFlow sees none")
    assert any("Skipping registering GPU devices" in r for r in cert["reasons"])


def test_gpus_all_through_the_hook_with_no_gpu_seen_fails(tmp_path):
    # The NVIDIA hook answers the request (the container starts) but the host has no driver or GPU.
    engine = FakeEngine(probe=NO_GPU, payload=lambda image, cmd, gpus: Payload(exit_code=1, result=result(
        [*cpu_checks(), {"name": "gpu.visible", "status": "fail", "detail": "no GPU", "values": {}}])))
    built(engine)
    res, cert = certify(engine, tmp_path, gpus="all")
    assert res.level == "failed" and cert["host"]["gpu_paths"] == ["hook"]
    assert engine.runs[0]["gpus"].count == -1


def test_auto_with_the_toolkit_but_no_gpu_is_not_a_request(tmp_path):
    engine = FakeEngine(probe=NO_GPU, payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks())))
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "cpu-verified" and engine.runs[0]["gpus"] is None
    assert any("can hand out GPUs (hook) but its host shows none" in n for n in cert["notes"])


def test_gpus_all_on_an_engine_that_cannot_hand_them_out(tmp_path):
    engine = FakeEngine(probe=None)
    built(engine)
    res, cert = certify(engine, tmp_path, gpus="all")
    assert res.level == "failed" and cert is None and engine.runs == []
    assert "cannot hand out GPUs (no NVIDIA runtime, hook or CDI device)" in res.summary


def test_cdi_only_engine_gets_a_cdi_request(tmp_path):
    info = {"Runtimes": {"runc": {}}, "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=0"}]}
    engine = FakeEngine(docker_info=info, probe=H200,
                        payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks() + gpu_checks(), gpus=1)))
    built(engine)
    res, _ = certify(engine, tmp_path)
    assert res.level == "gpu-certified"
    request = engine.runs[0]["gpus"]
    assert request.cdi and request.device_requests()[0]["Driver"] == "cdi"


def test_a_driver_too_old_for_the_cell_fails_a_gpu_request(tmp_path):
    old = dataclasses.replace(H200, version="470.82.01")
    engine = FakeEngine(docker_info={"Runtimes": {"nvidia": {}}}, probe=old)
    built(engine)
    res, _ = certify(engine, tmp_path)
    assert res.level == "failed" and "older than 525" in res.summary and engine.runs == []


def test_require_gpu_on_a_cpu_host_is_not_ok(tmp_path):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks())))
    built(engine)
    res, _cert = certify(engine, tmp_path, require_gpu=True)
    assert res.level == "cpu-verified" and not res.ok and "--require-gpu" in res.summary


@pytest.mark.parametrize(("payload", "reason"), [
    (Payload(exit_code=137, result=None), "the payload wrote no result (exit 137)"),
    (Payload(exit_code=None, result=None), "the payload timed out"),
])
def test_no_result_fails(tmp_path, payload, reason):
    engine = FakeEngine(payload=lambda image, cmd, gpus: payload)
    built(engine)
    res, cert = certify(engine, tmp_path)
    assert res.level == "failed" and cert["reasons"] == [reason]


def test_not_built(tmp_path):
    res, cert = certify(FakeEngine(), tmp_path)
    assert res.level == "not built" and "python -m builder build" in res.summary and cert is None


@pytest.fixture
def ctrl_c():
    """Python's Ctrl-C handler, whatever the runner left: a shell's background job starts with SIGINT ignored,
    and then interrupt_main() does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_once_started(engine: FakeEngine):
    def hook(_what, stop):
        _thread.interrupt_main()  # Ctrl-C, as the terminal would send it
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    return hook


def test_interrupted_certify_leaves_no_container_and_no_certificate(tmp_path, ctrl_c):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks())))
    engine.on_run = interrupt_once_started(engine)
    built(engine)
    with pytest.raises(Interrupted):
        certify_cells(engine, [CUDA_CELL], opts(tmp_path))
    assert engine.containers == set()
    assert State(tmp_path / "state").read_certificate(CUDA_CELL.tag) is None


# -------------------------------------------------------------------------------------------- build
def build_opts(tmp_path: Path, **kw) -> BuildOptions:
    return BuildOptions(state_dir=tmp_path / "state", sources=Sources(proxy=False, cache_dir=tmp_path / "c"),
                        keep_cache=True, **kw)


def test_the_record_splits_a_step_at_its_last_output_line(tmp_path):
    # What the bench's decomposition reads: a RUN step's seconds, and those after its last output (the commit).
    engine = FakeEngine(run_output=["Installed 25 packages in 3.1s", "No broken requirements found."])
    engine.add_image(CUDA_CELL.base.image)
    build_cells(engine, [CUDA_CELL], build_opts(tmp_path))
    first, run = State(tmp_path / "state").read_record(CUDA_CELL.tag)["steps"]
    assert first[:2] == [1, "FROM base"] and first[3] is None  # the builder's own lines are no output
    assert run[:2] == [2, "RUN pip install"] and 0.2 <= run[3] <= run[2]


def test_up_to_date_cells_are_not_built_again_and_a_moved_base_is_rebuilt(tmp_path):
    engine = FakeEngine()
    engine.add_image(CUDA_CELL.base.image)
    [first] = build_cells(engine, [CUDA_CELL], build_opts(tmp_path))
    assert first.status == "built" and State(tmp_path / "state").read_record(CUDA_CELL.tag)["image_id"] == first.image_id
    [second] = build_cells(engine, [CUDA_CELL], build_opts(tmp_path))
    assert second.status == "up to date" and second.image_id == first.image_id
    assert [c for c in engine.calls if c[0] == "build"] == [("build", CUDA_CELL.tag)]
    engine.add_image(CUDA_CELL.base.image)  # the base moved under the same tag
    [third] = build_cells(engine, [CUDA_CELL], build_opts(tmp_path))
    assert third.status == "built" and third.image_id != first.image_id
    [forced] = build_cells(engine, [CUDA_CELL], build_opts(tmp_path, force=True))
    assert forced.status == "built"


def test_fail_fast_starts_nothing_after_a_failure(tmp_path):
    engine = FakeEngine(failing_builds={CUDA_CELL.tag: "pip: no matching distribution"})
    engine.add_image(CUDA_CELL.base.image)
    results = build_cells(engine, [CUDA_CELL, CPU_CELL], build_opts(tmp_path, fail_fast=True))
    assert [r.status for r in results] == ["failed", "skipped"]
    assert "no matching distribution" in results[0].error and results[0].log_tail
    assert results[0].log_path.read_text().endswith("ERROR: pip: no matching distribution\n")
    results = build_cells(engine, [CUDA_CELL, CPU_CELL], build_opts(tmp_path))
    assert [r.status for r in results] == ["failed", "built"]


def test_interrupted_build_keeps_finished_work_and_leaves_no_container(tmp_path, ctrl_c):
    engine = FakeEngine()
    engine.add_image(CUDA_CELL.base.image)
    [done] = build_cells(engine, [CPU_CELL], build_opts(tmp_path))
    engine.containers.add("f" * 64)  # another builder's step container on the same engine
    engine.on_build = interrupt_once_started(engine)
    with pytest.raises(Interrupted):
        build_cells(engine, [CUDA_CELL], build_opts(tmp_path, force=True))
    assert engine.containers == {"f" * 64}  # ours are gone, theirs is untouched
    assert State(tmp_path / "state").read_record(CPU_CELL.tag)["image_id"] == done.image_id
    assert State(tmp_path / "state").read_record(CUDA_CELL.tag) is None


# -------------------------------------------------------------------------------------------- bases
def test_a_local_base_is_used_as_it_is():
    engine = FakeEngine()
    have = engine.add_image(CUDA_CELL.base.image)
    assert ensure_base(engine, CUDA_CELL.base) == (have.id, "local") and engine.calls == []


def test_a_missing_base_is_pulled_before_it_is_bootstrapped():
    engine = FakeEngine(pullable={CUDA_CELL.base.image})
    _, how = ensure_base(engine, CUDA_CELL.base)
    assert how == "pulled" and engine.calls == [("pull", CUDA_CELL.base.image)]


def test_a_base_that_cannot_be_pulled_is_bootstrapped(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "debootstrap"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nmkdir -p "$3/etc" && echo bookworm > "$3/etc/debian_version"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    engine = FakeEngine()
    image_id, how = ensure_base(engine, CUDA_CELL.base)
    assert how == "bootstrapped" and [c[0] for c in engine.calls] == ["pull", "import"]
    assert engine.image(CUDA_CELL.base.image).id == image_id


def test_a_bootstrapped_tree_gets_the_official_slim_images_configuration_and_trim(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    files = {
        "usr/share/doc/bash/copyright": "kept", "usr/share/doc/bash/README.gz": "cut",
        "usr/share/doc/dash/changelog.gz": "cut", "usr/share/man/man1/ls.1.gz": "cut",
        "usr/share/man/de/man1/ls.1.gz": "cut", "usr/share/locale/locale.alias": "kept",
        "usr/share/locale/de/LC_MESSAGES/dpkg.mo": "cut", "usr/share/zoneinfo/UTC": "kept",
        "usr/share/lintian/overrides/x": "cut", "usr/share/groff/current/font/devps/R": "kept (groff needs it)",
    }
    for name, what in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(what)
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "note").write_text("not the tree's")
    (root / "usr/share/info").symlink_to(outside / "dir")  # a top folder that is a link: never walked into
    doc = root / "usr/share/doc"
    (doc / "sh").symlink_to("dash")  # dangling once dash's folder is empty
    (doc / "bash/dash-notes").symlink_to("../dash")  # seen before dash goes: dangling only on a second pass
    (doc / "bash-copy").symlink_to("bash")  # still points at a kept folder
    # Links are the tree's, as in a chroot: /etc/passwd exists on this machine, not in the tree; `..` stops at
    # the tree's root; a link on the way (etc-host, absolute) is read inside the tree too.
    (doc / "escape").symlink_to("../../../../../../../../etc/passwd")
    (doc / "escape-abs").symlink_to("/../../etc/passwd")
    (root / "etc-host").symlink_to("/etc")
    (doc / "through").symlink_to("/etc-host/passwd")
    (root / "etc/alternatives").mkdir(parents=True)
    (root / "etc/alternatives/ls.1.gz").symlink_to("/usr/share/man/man1/ls.1.gz")
    (root / "usr/share/man/man1/dir.1.gz").symlink_to("/etc/alternatives/ls.1.gz")  # to a cut page, by two links
    (doc / "bash/bashref").symlink_to("/usr/share/doc/bash/copyright")
    (doc / "loop").symlink_to("loop")
    old = os.umask(0o077)
    try:
        slim(str(root))
    finally:
        os.umask(old)
    assert (root / "etc/dpkg/dpkg.cfg.d/docker-apt-speedup").read_text() == "force-unsafe-io\n"
    assert "Dir::Cache::pkgcache" in (root / "etc/apt/apt.conf.d/docker-clean").read_text()
    assert 'Acquire::Languages "none"' in (root / "etc/apt/apt.conf.d/docker-no-languages").read_text()
    assert 'GzipIndexes "true"' in (root / "etc/apt/apt.conf.d/docker-gzip-indexes").read_text()
    assert 'SuggestsImportant "false"' in (root / "etc/apt/apt.conf.d/docker-autoremove-suggests").read_text()
    assert "exit 101" in (root / "usr/sbin/policy-rc.d").read_text()
    assert (root / "usr/sbin/policy-rc.d").stat().st_mode & 0o777 == 0o755
    for conf in [*(root / "etc/apt/apt.conf.d").iterdir(), *(root / "etc/dpkg/dpkg.cfg.d").iterdir()]:
        assert conf.stat().st_mode & 0o777 == 0o644, conf  # readable whatever the umask was
    dpkg = (root / "etc/dpkg/dpkg.cfg.d/docker").read_text().splitlines()
    assert "path-exclude /usr/share/doc/*" in dpkg and "path-include /usr/share/doc/*/copyright" in dpkg
    assert dpkg.index("path-include /usr/share/doc/*/copyright") > dpkg.index("path-exclude /usr/share/doc/*")
    assert not any("groff" in line for line in dpkg)
    left = sorted(str(p.relative_to(root)) for p in (root / "usr").rglob("*") if p.is_file() or p.is_symlink())
    assert left == ["usr/sbin/policy-rc.d", "usr/share/doc/bash-copy", "usr/share/doc/bash/bashref",
                    "usr/share/doc/bash/copyright", "usr/share/groff/current/font/devps/R", "usr/share/info",
                    "usr/share/locale/locale.alias", "usr/share/zoneinfo/UTC"]
    assert (outside / "dir" / "note").read_text() == "not the tree's"
    # The manual sections' folders stay, empty (a package's script may link a page into one); others go.
    assert sorted(p.name for p in (root / "usr/share/man").iterdir()) == ["man1"]
    assert not any((root / "usr/share/man/man1").iterdir())


def test_every_way_failing_names_each_and_what_to_do(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    engine = FakeEngine()
    with pytest.raises(BaseImageError) as err:
        ensure_base(engine, CUDA_CELL.base)
    text = str(err.value)
    assert "not in the engine at fake://engine" in text and "pull failed: pull access denied" in text
    assert "bootstrap failed: debootstrap is not installed" in text and "docker load" in text
    no_bootstrap = dataclasses.replace(CUDA_CELL.base, bootstrap=None)
    with pytest.raises(BaseImageError, match="no bootstrap configured"):
        ensure_base(engine, no_bootstrap)


def test_certificate_json_is_what_the_index_names(tmp_path):
    engine = FakeEngine(payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks())))
    built(engine)
    _, cert = certify(engine, tmp_path)
    on_disk = json.loads(State(tmp_path / "state").certificate_path(CUDA_CELL.tag).read_text())
    assert on_disk["digest"] == cert["digest"] == certify_mod.digest(on_disk)


def test_a_build_removes_its_own_builder_stage_and_nothing_else(tmp_path):
    engine = FakeEngine()
    engine.add_image(CUDA_CELL.base.image)
    theirs = engine.add_image(None, {"org.builder.managed": "true"})  # another build's newest layer, mid-build
    [result] = build_cells(engine, [CUDA_CELL], dataclasses.replace(build_opts(tmp_path), keep_cache=False))
    assert result.status == "built" and engine.image(CUDA_CELL.tag).id == result.image_id
    untagged = [i for i in engine.images.values() if not i.tags]
    assert untagged == [theirs]  # our builder stage went; theirs, and our tagged result, stay


def test_a_pulled_image_is_probed_for_gpus_as_it_is(tmp_path):
    # `pull --recertify`: the pulled image has no parent and may not match this machine's content hash.
    engine = FakeEngine(docker_info={"Runtimes": {"nvidia": {}}}, probe=H200,
                        payload=lambda image, cmd, gpus: Payload(result=result(cpu_checks() + gpu_checks(), gpus=1)))
    pulled = engine.add_image("registry.example/builder/torch:x", {})
    res, _ = certify(engine, tmp_path, image=pulled.id)
    assert ("gpu_probe", pulled.id, engine.calls[0][2]) == engine.calls[0]
    assert res.level == "gpu-certified"


def test_a_failed_build_shows_what_the_proxy_upstream_said(tmp_path):
    import re
    import threading
    import urllib.error
    import urllib.request
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    # An index whose page links to a host that refuses connections: the file's fetch fails upstream.
    (tmp_path / "index" / "simple" / "x").mkdir(parents=True)
    (tmp_path / "index" / "simple" / "x" / "index.html").write_text(
        '<a href="http://127.0.0.1:9/x-1.0-py3-none-any.whl">x-1.0-py3-none-any.whl</a>')
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def fetch_through_the_proxy(tag, stop):
        index = re.search(r"index-url = (http://[0-9.:]+/\S*)", engine.last_files["sources/pip.conf"].decode())[1]
        page = urllib.request.urlopen(f"{index}/x/", timeout=30).read().decode()
        link = page.split('href="')[1].split('"')[0]
        with pytest.raises(urllib.error.HTTPError):  # pip would see a 502 here, and say little more
            urllib.request.urlopen(index.split("/simple")[0].rsplit("/", 1)[0] + link, timeout=30)

    engine = FakeEngine(failing_builds={CUDA_CELL.tag: "pip: could not fetch x"}, on_build=fetch_through_the_proxy)
    engine.add_image(CUDA_CELL.base.image)
    sources = Sources.from_env(index_url=f"http://127.0.0.1:{server.server_address[1]}/simple", environ={},
                               cache_dir=str(tmp_path / "c"))
    options = dataclasses.replace(build_opts(tmp_path), sources=sources)
    try:
        [result] = build_cells(engine, [CUDA_CELL], options)
    finally:
        server.shutdown()
    assert result.status == "failed"
    assert "the package proxy's upstream failed: x-1.0-py3-none-any.whl: URLError" in result.error
