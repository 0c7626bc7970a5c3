"""The bounded worker pool that build and certify share: one job per cell, a clean stop on Ctrl-C."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

from builder.errors import Interrupted
from builder.matrix.model import Cell

log = logging.getLogger("builder")


class Result(Protocol):
    @property
    def cell(self) -> Cell: ...

    @property
    def ok(self) -> bool: ...


R = TypeVar("R", bound=Result)


def run_pool(
    cells: list[Cell],
    jobs: int,
    work: Callable[[Cell, threading.Event], R],
    on_done: Callable[[R], None],
    placeholder: Callable[[Cell, str], R],
    cleanup: Callable[[], int],
    fail_fast: bool = False,
) -> list[R]:
    """Run `work` for each cell in a bounded pool. Ctrl-C: stop, clean up, then raise Interrupted.

    Shared by build and certify, which need the same stop-and-clean-up behaviour. `placeholder` makes
    the result of a cell that never ran ("skipped" or "interrupted").
    """
    stop = threading.Event()
    results: dict[str, R] = {}
    pending = list(cells)
    running: dict[Future[R], Cell] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    failed = False
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs) and not (fail_fast and failed):
                cell = pending.pop(0)
                running[pool.submit(work, cell, stop)] = cell
            if not running:
                break
            done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                cell = running.pop(fut)
                result = fut.result()
                results[cell.tag] = result
                failed = failed or not result.ok
                on_done(result)
        for cell in pending:
            results[cell.tag] = placeholder(cell, "skipped")
    except KeyboardInterrupt:
        stop.set()
        log.warning("interrupted: stopping %d job(s) and removing their containers ...", len(running))
        deadline = time.monotonic() + 120
        while running and time.monotonic() < deadline:
            cleanup()  # kills the step in flight, so the engine ends that build or run now
            done, _ = wait(list(running), timeout=1)
            for fut in done:
                cell = running.pop(fut)
                if fut.exception() is None:
                    results[cell.tag] = fut.result()
        cleanup()
        for cell in [*running.values(), *pending]:
            results.setdefault(cell.tag, placeholder(cell, "interrupted"))
        pool.shutdown(wait=False, cancel_futures=True)
        kept = sum(r.ok for r in results.values())
        raise Interrupted(f"interrupted: {kept} finished image(s) and their records were kept") from None
    pool.shutdown(wait=True)
    return [results[c.tag] for c in cells]
