"""The engine layer on a real engine: one-line errors, whole references, files read out of an image."""

from __future__ import annotations

import pytest

from builder.errors import EngineError

from .conftest import managed_containers

pytestmark = [pytest.mark.engine]


def test_engine_errors_are_one_line(engine):
    missing = "sha256:" + "0" * 64
    with pytest.raises(EngineError, match="failed \\(stamp\\)"):
        engine.stamp(missing, "builder-test/none:stamp", {"x": "y"})
    # a digest-pinned reference goes to the SDK whole (split by hand it became a bad tag)
    with pytest.raises(EngineError) as err:
        engine.pull(f"127.0.0.1:9/none/debian:bookworm@{missing}")
    assert "\n" not in str(err.value) and "invalid" not in str(err.value).lower()
    with pytest.raises(EngineError, match="a digest names registry content"):
        engine.import_rootfs(iter(()), f"none/debian@{missing}")


def test_files_are_read_through_symlinks_in_one_container(engine, torch_built):
    image_id = torch_built["image_id"]
    with engine.files(image_id) as read:
        # /etc/os-release is a relative symlink to ../usr/lib/os-release in Debian: it used to be a KeyError
        assert b"ID=debian" in read("/etc/os-release")
        assert read("/etc/no-such-file") is None
        assert read("/etc") is None  # a directory is not a file
        assert b"torch==2.4.1" in read("/opt/venv/requirements.lock")
    assert managed_containers(engine) == []


def test_untagged_images_are_not_pruned_while_another_run_is_live(engine):
    """A classic build's latest step image is untagged until the next step: `clean` pruning it broke a build
    running beside it ("unknown parent image ID"). While another run's lease is alive, nothing is pruned."""
    from builder.engine import Claim, Engine

    base = engine.image("debian:bookworm-slim")  # made by `builder base` before the tests (.ci/run)
    assert base is not None
    other = Engine.connect()  # another run: its own lease
    got = other.claim("build", "0" * 64, "builder-test/none:prune", base.id)
    assert isinstance(got, Claim) and got.id
    nothing = "org.builder.test-prune-nothing"  # a label no image has: the other tests' images stay
    try:
        assert engine.prune_dangling(nothing) is None
    finally:
        other.release(got)
        other.end_lease()
    assert engine.prune_dangling(nothing) == 0  # no live run: the prune runs (and finds nothing of that label)


def test_build_labels_are_one_step_and_taken_verbatim(engine):
    """The build's labels go in as one LABEL instruction (the SDK's labels were one step each on Engine 20.10);
    quotes, backslashes, `$` and a line break must neither be interpreted nor start an instruction."""
    import threading

    tag = "builder-test/labels:one-step"
    labels = {"org.builder.managed": "true", "org.builder.test": 'a "b" \\c $HOME ${x:-y}',
              "org.builder.test.lines": "one\nRUN false", "org.builder.test.plain": "v1.0"}
    lines: list[str] = []
    image_id = engine.build({"Dockerfile": b"FROM debian:bookworm-slim\nCMD [\"true\"]"}, tag=tag, labels=labels,
                            on_line=lines.append, stop=threading.Event())
    try:
        got = engine.api.inspect_image(image_id)["Config"]["Labels"]
        assert {k: got.get(k) for k in labels} == {**labels, "org.builder.test.lines": "one RUN false"}
        assert [line for line in lines if line.startswith("Step ")][-1].startswith("Step 3/3 : LABEL ")
    finally:
        engine.api.remove_image(image_id, force=True)
