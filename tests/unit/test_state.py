"""The state directory's API: atomic writes, the index under a lock across processes, publish records."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from builder.state import LEVELS, PublishRecord, State, level_at_least, safe_name, write_json


def certificate(tag: str, level: str = "cpu-verified", digest: str = "sha256:aa") -> dict:
    return {"image": {"id": "sha256:img", "tag": tag}, "level": level, "digest": digest, "time": "2025-01-01T00:00:00Z"}


def publish(tag: str, cert_digest: str = "sha256:aa") -> PublishRecord:
    return PublishRecord(tag=tag, registry="127.0.0.1:5000", repository="127.0.0.1:5000/ns/tf",
                         digest="sha256:" + "1" * 64, reference="127.0.0.1:5000/ns/tf@sha256:" + "1" * 64,
                         tags=("a", "b"), certificate_digest=cert_digest, certificate_artifact="sha256-1.cert",
                         image_id="sha256:img", noop=False, seconds=1.5, time="2025-01-01T00:00:01Z")


def test_layout_and_round_trip(tmp_path: Path) -> None:
    state = State(tmp_path)
    tag = "builder/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"
    assert safe_name(tag) == "builder_tensorflow_2.18.0-cpu-py3.11-runtime-debian12"
    state.write_record(tag, {"tag": tag, "size": 3})
    assert state.read_record(tag) == {"tag": tag, "size": 3}
    assert state.record_path(tag).parent == tmp_path / "records"
    assert state.log_path(tag).name == safe_name(tag) + ".log"
    assert state.log_path(tag, "certify").name == safe_name(tag) + ".certify.log"
    assert state.log_path(tag).parent.is_dir()
    assert state.read_certificate(tag) is None and state.read_record("other:1") is None
    state.write_certificate(tag, certificate(tag))
    assert state.index() == {}  # the index follows only once the image is stamped
    state.index_certificate(tag, certificate(tag))
    assert state.read_certificate(tag) == certificate(tag)
    assert json.loads(state.index_path.read_text())[tag]["digest"] == "sha256:aa"
    assert [e.tag for e in state.certified()] == [tag]
    assert state.certified("gpu-certified") == []


def test_write_json_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "x.json", {"k": 1})
    write_json(tmp_path / "a" / "x.json", {"k": 2})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 2}


def test_levels_order() -> None:
    assert level_at_least("gpu-certified", "cpu-verified")
    assert not level_at_least("cpu-verified", "gpu-certified")
    assert not level_at_least("failed", "cpu-verified")
    assert not level_at_least("not built", "failed")
    assert LEVELS[0] == "failed"


def test_publish_marks_the_index_only_for_the_same_certificate(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.index_certificate("t:1", certificate("t:1"))
    state.write_publish(publish("t:1"))
    entry = state.index()["t:1"]
    assert entry.published is not None and entry.published.reference.endswith("1" * 64)
    assert state.read_publish("t:1") == publish("t:1")
    # a new certificate drops the old push: it carried the old digest
    state.index_certificate("t:1", certificate("t:1", digest="sha256:bb"))
    assert state.index()["t:1"].published is None
    # a push of a stale certificate is recorded, but does not mark the current entry
    state.write_publish(publish("t:1", cert_digest="sha256:aa"))
    assert state.index()["t:1"].published is None


def _add_entries(root: str, start: int) -> None:
    state = State(Path(root))
    for i in range(start, start + 40):
        state.index_certificate(f"t:{i}", certificate(f"t:{i}"))


def test_index_updates_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_entries, args=(str(tmp_path), n * 100)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert len(State(tmp_path).index()) == 160
