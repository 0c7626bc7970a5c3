"""Command line: argparse -> selection and options -> the stage that does the work.

This is the one place that turns BuilderError into a message and an exit code; the traceback is shown
only with --debug.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import __version__
from builder.errors import BaseImageError, BuilderError, NotCertified, RegistryError, UsageError

if TYPE_CHECKING:
    import argparse

    from builder.build import BuildResult
    from builder.certify import CertifyOptions, CertifyResult
    from builder.matrix import Cell, Rejection, Selection

# Each command imports the stages it needs inside its own function: the Docker SDK, rich, Jinja2, the SBOM
# and registry code cost about half a second to import, which an up-to-date `build` must not pay. main() asks
# builder.uptodate before it builds the parser; keep this module's own imports to the few above (argparse and
# signal too are imported where they are used: 3 ms of a 60 ms no-op).


class _Log:
    """logging.getLogger("builder"), logging imported at first use: it costs an up-to-date `build` (answered
    before logging is set up) about 8 ms of its 80."""

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger("builder"), name)


log = _Log()


def printable(text: str, limit: int | None = 80) -> str:
    """builder.matrix.model.printable, imported when first needed (the matrix package loads pydantic)."""
    from builder.matrix.model import printable as escape

    return escape(text, limit)


def _bad_value(message: str) -> Exception:
    """argparse's error for a bad option value; argparse is imported only where a command line is parsed (an
    up-to-date `build` is answered without it)."""
    import argparse

    return argparse.ArgumentTypeError(message)


def jobs_count(text: str) -> int:
    """-j: a whole number from 1 to 64 (argparse type: a bad one is a usage error before any work)."""
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 3 else 0
    if not 1 <= value <= 64:
        raise _bad_value(f"{printable(text, 40)!r} is not a number of jobs from 1 to 64")
    return value


MAX_TIMEOUT = 7 * 24 * 3600


def seconds(text: str) -> float:
    """--timeout: seconds, more than 0 and at most a week (not nan, inf or negative)."""
    try:
        value = float(text) if text.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise _bad_value(f"{printable(text, 40)!r} is not a number of seconds from 0 to "
                         f"{MAX_TIMEOUT} (a week)")
    return value


MEMORY = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)([bkmg]?)b?", re.ASCII | re.IGNORECASE)
MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def memory_size(text: str) -> str:
    """--memory: a size as the engine takes it (512m, 8g, 1.5g), from 6 MiB (the engine's minimum) to 1 PiB."""
    match = MEMORY.fullmatch(text.strip())
    size = float(match[1]) * MEMORY_UNITS[match[2].lower()] if match else 0
    if not (6 << 20) <= size <= (1 << 50):
        raise _bad_value(f"{printable(text, 40)!r} is not a memory size such as 512m or 8g (from 6m to 1048576g)")
    return text.strip().lower()


def _selectors(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selectors (every selector given must match; repeat one to OR its values)")
    group.add_argument("--cuda", action="append", help="CUDA line, e.g. 12.1, or cpu")
    group.add_argument("--python", action="append", help="Python version, e.g. 3.11")
    group.add_argument("--framework", action="append",
                       help="a framework of the matrix (torch, tensorflow), or NAME==VERSION such as torch==2.4.1")
    group.add_argument("--flavor", action="append", choices=["runtime", "devel"])
    group.add_argument("--only", action="append", default=[], metavar="TAG-GLOB",
                       help="keep cells whose tag matches this glob; repeat to OR several")


def _values(value: str | list[str] | None) -> tuple[str, ...] | None:
    """A selector's values: argparse gives a list (append), a test or a default may give one string."""
    if value is None:
        return None
    return tuple(dict.fromkeys([value] if isinstance(value, str) else value))


def selection(args: argparse.Namespace) -> Selection:
    from builder.matrix import Selection

    # A framework the matrix does not define is answered by no_match with the names it does define.
    frameworks = _values(args.framework)
    return Selection(cuda=_values(args.cuda), python=_values(args.python), framework=frameworks,
                     flavor=_values(args.flavor), only=tuple(args.only))


def select_cells(args: argparse.Namespace) -> list[Cell]:
    from builder.matrix import expand, load_matrix, no_match

    matrix = load_matrix(args.matrix)
    sel = selection(args)
    cells, _ = expand(matrix, sel)
    if not cells:
        raise UsageError(f"{printable(str(args.matrix))}: no cell matches the selectors: "
                         f"{no_match(sel, expand(matrix)[0])}")
    return cells


def _row(cell: Cell) -> dict[str, Any]:
    return {
        "tag": cell.tag, "base": cell.base.image, "python": cell.python, "cuda": cell.cuda or "cpu",
        "cudnn": cell.cudnn or "-", "framework": f"{cell.framework}=={cell.version}", "flavor": cell.flavor,
    }


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    out = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    out += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(out)


def _dropped(rejection: Rejection) -> dict[str, Any]:
    combo, violation = rejection.combo, rejection.violation
    return {"framework": combo.framework, "version": combo.version, "cuda": combo.cuda, "python": combo.python,
            "flavor": combo.flavor, "base": combo.base, "rule": violation.rule, "reason": violation.message,
            "fact_at": violation.where, "where": rejection.where, "tags": list(rejection.tags)}


def cmd_matrix(args: argparse.Namespace) -> int:
    from builder.matrix import expand, load_matrix, no_match

    matrix = load_matrix(args.matrix)
    sel = selection(args)
    cells, dropped = expand(matrix, sel)
    if not cells:
        if args.explain:
            _explain(args.format, dropped)
        raise UsageError(f"{printable(str(args.matrix))}: no cell matches the selectors: "
                         f"{no_match(sel, expand(matrix)[0])}")
    if args.shard:
        from builder import shard
        from builder.state import State

        k, n = shard.parse_shard(args.shard)
        state = State(Path(args.state))
        cells = shard.partition(cells, n, state)[k - 1]
        costs = shard.expected(cells, state)
        log.info("shard %d/%d: %d cell(s), expected %.0f s of work and %.1f GB of images (%d from records)", k, n,
                 len(cells), sum(c.seconds for c in costs.values()), sum(c.size for c in costs.values()) / 1e9,
                 sum(c.source != "estimate" for c in costs.values()))
    rows = [{**_row(c), "claims": c.claims()} for c in cells]
    if args.format == "json" and args.explain:
        print(json.dumps({"cells": rows, "dropped": [_dropped(r) for r in dropped]}, indent=2))
    elif args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "github":
        include = [{"tag": c.tag, "framework": c.framework, "version": c.version, "cuda": c.cuda or "cpu",
                    "python": c.python, "flavor": c.flavor, "base": c.base.name} for c in cells]
        print(json.dumps({"include": include}))
        if args.explain:
            _explain(args.format, dropped)
    else:
        print(table([_row(c) for c in cells]))
        if args.explain:
            _explain(args.format, dropped)
    log.info("%d cells", len(cells))
    return 0


def _explain(fmt: str, dropped: list[Rejection]) -> None:
    """The dropped combinations: after the table on stdout; as JSON; or, beside a GitHub matrix (whose every
    key would become a job dimension), on stderr so stdout stays the matrix."""
    if fmt == "json":
        print(json.dumps({"cells": [], "dropped": [_dropped(r) for r in dropped]}, indent=2))
        return
    stream = sys.stderr if fmt == "github" else sys.stdout
    print(f"{'' if fmt == 'github' else chr(10)}Dropped combinations ({len(dropped)}):", file=stream)
    for rejection in dropped:
        print(f"  {rejection.where}: {rejection}", file=stream)


def cmd_render(args: argparse.Namespace) -> int:
    from builder.render import check_out, render, write_contexts

    cells = select_cells(args)
    out = check_out(args.out)  # before anything is written
    contexts = [render(cell) for cell in cells]
    paths = write_contexts(contexts, out)
    for context in contexts:
        print(f"{context.cell.tag}  {context.content_hash[:12]}  {paths[context.cell.tag]}")
    return 0


def _sources_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("build-time package sources (builder stage only, never in the image)")
    group.add_argument("--ca-bundle", help="CA bundle for HTTPS to the indexes (default: $PIP_CERT, "
                       "$REQUESTS_CA_BUNDLE or $SSL_CERT_FILE)")
    group.add_argument("--index-url", help="package index (default: $PIP_INDEX_URL, else PyPI)")
    group.add_argument("--extra-index-url", action="append", help="extra index; repeatable "
                       "(default: $PIP_EXTRA_INDEX_URL)")
    group.add_argument("--find-links", action="append", help="wheelhouse folder or URL; repeatable "
                       "(default: $PIP_FIND_LINKS)")
    group.add_argument("--cache-dir", default=os.environ.get("BUILDER_CACHE"),
                       help="host package cache shared by all cells (default: ~/.cache/builder/packages)")
    group.add_argument("--no-proxy", action="store_true", help="let pip in the builder stage reach the "
                       "indexes itself (with the CA bundle) instead of through the host's caching proxy")


def _state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", default=os.environ.get("BUILDER_STATE", ".builder"),
                        help="where logs, build records and certificates go (default: .builder)")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n else "-"


def build_summary(results: list[BuildResult]) -> str:
    rows = [{
        "cell": r.cell.tag, "result": r.status, "time": f"{r.seconds:.0f} s", "size": _mb(r.size),
        "image": (r.image_id or "-").removeprefix("sha256:")[:12], "fetched": _mb(r.upstream_bytes),
        "from cache": _mb(r.cached_bytes),
    } for r in results]
    return table(rows)


def _selectors_of(args: argparse.Namespace) -> list[str]:
    from builder import uptodate

    return uptodate.selectors({name: _values(getattr(args, name)) for name in uptodate.SELECTORS})


def _up_to_date(args: argparse.Namespace) -> int | None:
    """The no-op fast path after argparse (a command line `_fast_build` left to the parser)."""
    if args.force or args.no_cache:
        return None
    return _answer(args.matrix, args.state, _selectors_of(args), args.jobs)


def _fast_build(argv: Sequence[str] | None) -> int | None:
    """The no-op fast path before argparse: a plain `build` command line whose cells are all up to date."""
    from builder import uptodate

    invocation = uptodate.parse_build(list(sys.argv[1:] if argv is None else argv))
    if invocation is None:
        return None
    return _answer(invocation.matrix, invocation.state, invocation.selectors, invocation.jobs)


def _answer(matrix_file: str, state_dir: str, selectors: list[str], jobs: int) -> int | None:
    """The no-op fast path (builder.uptodate): 0 with the summary printed when every cell is up to date,
    None when the full path must decide."""
    from builder import uptodate

    matrix, state = Path(matrix_file), Path(state_dir)
    sock = uptodate.local_socket()
    if sock is None or not matrix.is_file():
        return None
    stamped = uptodate.read_stamp(state, uptodate.key(matrix, selectors))
    found = uptodate.check(stamped, sock) if stamped else None
    if not found:
        return None
    # What logging (format "%(message)s", stderr) would print; this path runs before logging is set up.
    print(f"building {len(found)} cell(s) with {jobs} job(s) on unix://{sock}", file=sys.stderr)
    print(table([{"cell": f.tag, "result": "up to date", "time": "0 s", "size": _mb(f.size),
                  "image": f.image_id.removeprefix("sha256:")[:12], "fetched": "-", "from cache": "-"}
                 for f in found]))
    return 0


def _stamp(args: argparse.Namespace, engine: Any, cells: list[Cell]) -> None:
    """After a build where every cell is fine: what the next `build` needs to skip the full path."""
    from builder import uptodate
    from builder.render import render

    stamped = []
    for cell in cells:
        base = engine.image(cell.base.image)
        if base is None:
            return
        stamped.append(uptodate.Stamped(tag=cell.tag, content_hash=render(cell, base_id=base.id).content_hash,
                                        base=cell.base.image, base_id=base.id))
    try:
        uptodate.write_stamp(Path(args.state), uptodate.key(Path(args.matrix), _selectors_of(args)), stamped)
    except OSError as exc:  # the stamp only saves time: never fail a build for it
        log.debug("no up-to-date stamp: %s", exc)


def cmd_build(args: argparse.Namespace) -> int:
    fast = _up_to_date(args)
    if fast is not None:
        return fast
    from builder.build import BuildOptions, build_cells
    from builder.engine import Engine
    from builder.models import mirror_from
    from builder.sources import Sources

    cells = select_cells(args)
    sources = Sources.from_env(ca_bundle=args.ca_bundle, index_url=args.index_url,
                               extra_index_urls=args.extra_index_url, find_links=args.find_links,
                               cache_dir=args.cache_dir, proxy=not args.no_proxy)
    engine = Engine.connect()
    options = BuildOptions(state_dir=Path(args.state), sources=sources, jobs=args.jobs, force=args.force,
                           fail_fast=args.fail_fast, no_layer_cache=args.no_cache, keep_cache=args.keep_stages,
                           model_mirror=mirror_from(args.model_mirror))
    log.info("building %d cell(s) with %d job(s) on %s", len(cells), args.jobs, engine.address)
    results = build_cells(engine, cells, options)
    for r in results:
        if r.status == "failed":
            print(f"error: {r.cell.tag}: build failed: {r.error}", file=sys.stderr)
            for line in r.log_tail[-8:]:
                print(f"    | {line}", file=sys.stderr)
            if r.log_path:
                print(f"    whole log: {r.log_path}", file=sys.stderr)
    print(build_summary(results))
    failed = [r for r in results if not r.ok]
    if not failed and Path(args.matrix).is_file():
        _stamp(args, engine, cells)
    return 1 if failed else 0


def certify_summary(results: list[CertifyResult]) -> str:
    rows = [{"cell": r.cell.tag, "level": r.level, "time": f"{r.seconds:.0f} s",
             "detail": r.summary[:140]} for r in results]
    return table(rows)


def _certify_options(args: argparse.Namespace) -> CertifyOptions:
    from builder.certify import CertifyOptions

    gpus = args.gpus
    if gpus not in ("auto", "all", "none") and not (gpus.isascii() and gpus.isdigit() and 0 < int(gpus) < 1000):
        raise UsageError(f"--gpus {gpus}: use auto, all, none or a number of GPUs (1 or more)")
    return CertifyOptions(state_dir=Path(args.state), gpus=gpus, require_gpu=args.require_gpu,
                          timeout=args.timeout, memory=args.memory, jobs=args.jobs, force=args.force)


def cmd_certify(args: argparse.Namespace) -> int:
    from builder.certify import certify_cells
    from builder.engine import Engine

    cells = select_cells(args)
    options = _certify_options(args)
    engine = Engine.connect()
    log.info("certifying %d image(s) on %s", len(cells), engine.address)
    results = certify_cells(engine, cells, options)
    print(certify_summary(results))
    return 0 if all(r.ok for r in results) else 1


def _certify_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", default="auto", help="auto (all GPUs, where the engine can hand them out through "
                        "the NVIDIA runtime, hook or CDI and its host lists one), all, none, or a number; GPUs "
                        "asked for and not seen fail the image (default auto)")
    parser.add_argument("--force", action="store_true", help="re-run images whose certificate is current")
    parser.add_argument("--require-gpu", action="store_true", help="fail unless every image is gpu-certified")
    parser.add_argument("--timeout", type=seconds, default=900.0,
                        help="seconds one image's run may take (default 900)")
    parser.add_argument("--memory", type=memory_size, default="8g", help="memory limit of a run (default 8g)")


def cmd_base(args: argparse.Namespace) -> int:
    from builder.bases import ensure_base
    from builder.engine import Engine

    bases = {c.base.image: c.base for c in select_cells(args) if not args.names or c.base.name in args.names}
    if args.names and not bases:
        raise UsageError(f"{printable(str(args.matrix))}: no selected cell uses base "
                         f"{printable(', '.join(args.names), 200)}")
    engine = Engine.connect()
    rows, failed = [], 0
    for image, base in sorted(bases.items()):
        try:
            image_id, how = ensure_base(engine, base)
            rows.append({"base": base.name, "image": image, "result": how, "id": image_id.split(":")[-1][:12]})
        except BaseImageError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            rows.append({"base": base.name, "image": image, "result": "failed", "id": "-"})
    print(table(rows))
    return 1 if failed else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from builder import doctor

    return doctor.main(select_cells(args), state_dir=Path(args.state), registry=args.registry, fmt=args.format)


def cmd_clean(args: argparse.Namespace) -> int:
    from builder.engine import MANAGED, TAG, Engine

    cells = select_cells(args)
    engine = Engine.connect()
    containers = engine.remove_containers(MANAGED, running=False)
    images = sum(engine.remove_images_with_label(TAG, c.tag) for c in cells)
    if engine.prune_dangling(MANAGED) is None:
        log.warning("kept untagged images on %s: another run is building there (its step images are untagged "
                    "between steps); run clean again when it is done", engine.address)
    print(f"removed {images} image(s) of {len(cells)} cell(s) and {containers} leftover container(s)")
    return 0


def cmd_facts(args: argparse.Namespace) -> int:
    from builder import facts
    from builder.matrix import load_matrix
    from builder.sources import Sources

    matrix = load_matrix(args.matrix)
    sources = Sources.from_env(ca_bundle=args.ca_bundle, index_url=args.index_url)
    sel = selection(args)
    wanted = sel.frameworks()
    found = facts.check(matrix, facts.Index(sources), {name for name, _ in wanted} or None)
    found = [f for f in found if not wanted or any(f.framework == n and v in (None, f.version) for n, v in wanted)]
    rows = [{"framework": f"{f.framework}=={f.version}", "line": f.line, "fact": f.fact, "matrix": f.matrix,
             "index": f.index, "verdict": f.verdict, "where": f.where} for f in found]
    print(table(rows))
    differs = [f for f in found if f.verdict == "differs"]
    for f in differs:
        print(f"error: {f.where}: {f.framework} {f.version} {f.fact}: matrix says {f.matrix}, the index's metadata "
              f"says {f.index}", file=sys.stderr)
    return 1 if differs else 0


def _registry(args: argparse.Namespace) -> str:
    """--registry, else `registry:` in the matrix, else $BUILDER_REGISTRY; one line if none or a bad one."""
    from builder import tags
    from builder.matrix import load_matrix

    matrix = load_matrix(args.matrix)
    try:
        chosen = tags.choose_registry(args.registry, getattr(matrix.spec, "registry", None),
                                      os.environ.get(tags.REGISTRY_ENV))
    except tags.InvalidName as exc:
        raise UsageError(str(exc)) from None
    if chosen is None:
        raise UsageError(f"no registry: give --registry HOST[:PORT][/NAMESPACE], `registry:` in {args.matrix}, "
                         f"or ${tags.REGISTRY_ENV}")
    return chosen[0]


def _publish_exit(results: list[Any], refused: str = "refused") -> int:
    """0 when all went well; 8 when the worst was a refusal (not certified), 7 for a registry failure."""
    codes = {r.status for r in results if not r.ok}
    for r in results:
        if not r.ok:
            print(f"error: {r.detail}", file=sys.stderr)
    if not codes:
        return 0
    return NotCertified.exit_code if codes == {refused} else RegistryError.exit_code


def cmd_push(args: argparse.Namespace) -> int:
    from builder import publish
    from builder.engine import Engine
    from builder.matrix import load_matrix
    from builder.state import State

    cells = select_cells(args)
    registry = _registry(args)
    engine = Engine.connect()
    aliases = publish.aliases_for(load_matrix(args.matrix), cells)
    results = publish.push_cells(engine, cells, State(Path(args.state)), registry, require=args.require,
                                 allow_uncertified=args.allow_uncertified, aliases=aliases)
    print(table([{"cell": r.cell.tag, "result": r.status, "time": f"{r.seconds:.1f} s",
                  "reference": r.reference or "-"} for r in results]))
    return _publish_exit(results)


def cmd_resolve(args: argparse.Namespace) -> int:
    from builder import publish

    cells = select_cells(args)
    found = publish.resolve_cells(cells, _registry(args), args.require)
    text = publish.format_resolved(found, args.format)
    if text:
        print(text)
    for r in found:
        if not r.ok:
            print(f"error: {r.cell.tag}: {r.problem}", file=sys.stderr)
    return 0 if all(r.ok for r in found) else 1


def cmd_pull(args: argparse.Namespace) -> int:
    from builder import publish
    from builder.certify import CertifyOptions
    from builder.engine import Engine
    from builder.state import State

    cells = select_cells(args)
    registry = _registry(args)
    engine = Engine.connect()
    options = CertifyOptions(state_dir=Path(args.state), gpus=args.gpus, timeout=args.timeout, memory=args.memory)
    results = publish.pull_cells(engine, cells, State(Path(args.state)), registry, require=args.require,
                                 recertify=args.recertify, certify_options=options)
    print(table([{"cell": r.cell.tag, "result": r.status, "time": f"{r.seconds:.0f} s",
                  "reference": r.reference or "-"} for r in results]))
    return _publish_exit(results, refused="")


def cmd_report(args: argparse.Namespace) -> int:
    from builder import report  # jinja2 templates and matplotlib are only loaded for this command
    from builder.matrix import expand, load_matrix
    from builder.state import State

    matrix = load_matrix(args.matrix)
    sel = selection(args)
    cells, _ = expand(matrix, sel)
    out = Path(args.out)
    made = report.make(State(Path(args.state)), cells, sel, out)
    counts = ", ".join(f"{n} {label}" for label, n in made.counts.items() if n)
    print(f"{out / 'index.html'}: {len(made.entries)} cells ({counts or 'none'})")
    print(f"{out / 'summary.md'}: for $GITHUB_STEP_SUMMARY")
    if made.plot_png is not None:
        print(f"{out / 'plot.png'}: image size and build time per cell")
    elif made.built:
        print(f"note: no plot: {made.plot_note}", file=sys.stderr)
    return 0


def _publish_flags(parser: argparse.ArgumentParser) -> None:
    from builder import tags

    parser.add_argument("--registry", help="HOST[:PORT][/NAMESPACE] (default: `registry:` in the matrix, else "
                        f"${tags.REGISTRY_ENV}); credentials come only from `docker login`")
    parser.add_argument("--require", choices=["cpu-verified", "gpu-certified"], default="cpu-verified",
                        help="the lowest certification level accepted (default cpu-verified)")


def parser() -> argparse.ArgumentParser:
    import argparse

    top = argparse.ArgumentParser(prog="python -m builder", description=__doc__)
    top.add_argument("--matrix", default=os.environ.get("BUILDER_MATRIX", "matrix.yaml"),
                     help="the matrix file (default: matrix.yaml, or $BUILDER_MATRIX)")
    top.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    top.add_argument("--version", action="version", version=f"builder {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("matrix", help="list the cells the matrix asks for")
    _selectors(p)
    p.add_argument("--format", choices=["table", "json", "github"], default="table")
    p.add_argument("--explain", action="store_true", help="also list the dropped combinations and why (with "
                   "--format json: {\"cells\": [...], \"dropped\": [...]}; with github: on stderr)")
    p.add_argument("--shard", metavar="K/N", help="only shard K of N, balanced by expected build time and size "
                   "(from --state's records of an earlier run, else per-framework estimates)")
    _state_option(p)
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("render", help="write one build context per cell")
    _selectors(p)
    p.add_argument("--out", required=True, help="a new or empty directory to write the contexts into, or one an "
                   "earlier render wrote (replaced whole, so no stale file is left in a context)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("build", help="build the selected cells' images")
    _selectors(p)
    _sources_options(p)
    _state_option(p)
    p.add_argument("-j", "--jobs", type=jobs_count, default=1, help="builds at once (default 1)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date image exists")
    p.add_argument("--fail-fast", action="store_true", help="start no new build after a failure")
    p.add_argument("--no-cache", action="store_true", help="reuse no engine layer (a cold build; with --force)")
    p.add_argument("--keep-stages", action="store_true", help="keep the builder-stage images (as large as the "
                   "image): a rebuild that changes only later layers (models, labels) then skips pip; "
                   "`clean` removes them")
    p.add_argument("--model-mirror", default=None, metavar="URL", help="fetch the matrix's models from this mirror, "
                   "under their canonical URLs' paths (default: $BUILDER_MODEL_MIRROR, else the canonical URLs)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("certify", help="run the smoke test in each built image and write its certificate")
    _selectors(p)
    _state_option(p)
    _certify_flags(p)
    p.add_argument("-j", "--jobs", type=jobs_count, default=1, help="images certified at once (default 1)")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("facts", help="check the matrix's Python ranges and cuDNN pins against the index's metadata")
    p.add_argument("--framework", action="append", help="torch, tensorflow, or NAME==VERSION; repeatable")
    p.add_argument("--ca-bundle", help="CA bundle for HTTPS (default: $PIP_CERT, ...)")
    p.add_argument("--index-url", help="index to read (default: $PIP_INDEX_URL, else PyPI)")
    p.set_defaults(func=cmd_facts, cuda=None, python=None, flavor=None, only=[])

    p = sub.add_parser("base", help="make the base images available (local, pull, or bootstrap)")
    p.add_argument("names", nargs="*", metavar="NAME", help="base names from the matrix (default: all used)")
    _selectors(p)
    p.set_defaults(func=cmd_base)

    p = sub.add_parser("doctor", help="can this host run the selected images on its GPUs, and if not, why not")
    _selectors(p)
    _state_option(p)
    p.add_argument("--registry", help="also look for certified images there, through `resolve`")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("push", help="push certified images, their tags and their certificates to a registry")
    _selectors(p)
    _state_option(p)
    _publish_flags(p)
    p.add_argument("--allow-uncertified", action="store_true",
                   help="push even what is not certified at the required level (said so, and not recorded)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("resolve", help="print the registry's pinned references (repo@sha256:...) of certified images")
    _selectors(p)
    _publish_flags(p)
    p.add_argument("--format", choices=["text", "json", "env"], default="text",
                   help="one reference a line, JSON, or KEY=VALUE lines for a CI environment")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("pull", help="pull certified images by digest and check them against their certificates")
    _selectors(p)
    _state_option(p)
    _publish_flags(p)
    p.add_argument("--recertify", action="store_true",
                   help="also run the smoke test on the pulled image and compare with its certificate")
    p.add_argument("--gpus", default="auto", help="GPUs for --recertify (as for certify; default auto)")
    p.add_argument("--timeout", type=seconds, default=900.0,
                   help="seconds the --recertify run may take (default 900)")
    p.add_argument("--memory", type=memory_size, default="8g", help="memory limit of the --recertify run (default 8g)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("report", help="write a self-contained HTML report, a Markdown summary and a plot of the state")
    _selectors(p)
    _state_option(p)
    p.add_argument("--out", default="report", help="folder to write index.html, summary.md, plot.png and the "
                   "copied logs and certificates into (default: report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("clean", help="remove the selected cells' images and any leftover builder containers")
    _selectors(p)
    p.set_defaults(func=cmd_clean)
    return top


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    try:
        fast = _fast_build(argv)  # an up-to-date `build`, answered before the parser and logging are set up
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if fast is not None:
        return fast
    args = parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(message)s")
    # SIGTERM (CI cancelling a job, `docker stop`, kill) gets the same clean stop as Ctrl-C.
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except BuilderError as exc:
        if args.debug:
            log.exception("failed")
        matrix_file = printable(str(args.matrix), None)
        for line in exc.lines():
            # Every line escaped and cut here too, whichever module wrote it: one problem, one terminal line.
            shown = printable(line, 2000)
            print(shown if shown.startswith(matrix_file) else f"error: {shown}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
