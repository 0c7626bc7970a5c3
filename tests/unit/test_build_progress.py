"""The long pip step is visible: the package proxy's bytes reach the build progress while the build runs."""

from __future__ import annotations

import logging
import time

import pytest

from builder import build
from builder.sources import PackageProxy
from tests.unit.golden import CELLS, cell


def test_plain_progress_reports_fetched_cached_rate_and_elapsed(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    monkeypatch.setattr(build, "PLAIN_EVERY_S", 0.05)
    monkeypatch.setenv("CI", "1")  # not a terminal: plain lines
    one = cell(next(iter(CELLS)))
    proxy = PackageProxy(["https://pypi.invalid/simple"], tmp_path, context=None)  # type: ignore[arg-type]
    progress = build.Progress([one])
    assert progress.every == 0.05
    with caplog.at_level(logging.INFO, logger="builder"), build.watch_packages(progress, one, proxy):
        proxy.upstream_bytes, proxy.cached_bytes = 250_000_000, 40_000_000
        time.sleep(0.3)  # several periods, one change: one line
    lines = [r.getMessage() for r in caplog.records if "packages:" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{one.tag}: packages: 250 MB fetched, 40 MB from cache, ")
    assert " MB/s, " in lines[0] and lines[0].endswith(" s")


def test_no_proxy_no_reports(caplog: pytest.LogCaptureFixture) -> None:
    one = cell(next(iter(CELLS)))
    with caplog.at_level(logging.INFO, logger="builder"), build.watch_packages(build.Progress([one]), one, None):
        pass
    assert not [r for r in caplog.records if "packages:" in r.getMessage()]
