"""The report of a run: one self-contained page (index.html) with a framework x CUDA x Python grid, a
Markdown summary for $GITHUB_STEP_SUMMARY, and a plot of image size and build time per cell.

Everything is read through builder.state (records, certificates, publish records, logs); the logs and
certificates are copied beside the page, so the folder can be moved, archived or served as it is.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from packaging.version import InvalidVersion, Version

from builder import __version__
from builder.matrix import Cell, Selection
from builder.state import LEVELS, State, safe_name

PLOT_HINT = "pip install -e '.[report]' (matplotlib) and run the report again"
NOT_CERTIFIED = "not certified"
NOT_BUILT = "not built"
# Checks whose values carry a loss curve's ends, and how the report names them.
LOSS_CHECKS = {"train.cpu.mlp": "MLP loss", "train.cpu.conv": "CNN loss", "gpu.train_mixed_precision": "GPU AMP loss"}
REASON_CHARS = 160  # a failure reason in a grid cell; the whole text is in the certificate and its tooltip


@dataclass(frozen=True, kw_only=True)
class Measure:
    label: str
    value: str


@dataclass(frozen=True, kw_only=True)
class Link:
    label: str
    href: str  # relative to the report folder


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One cell as the report shows it."""

    tag: str
    framework: str
    version: str
    cuda: str  # "cpu" or the CUDA line
    python: str
    flavor: str
    base: str
    status: str  # not built, built, pulled (a certificate and no build here), rebuilt since certified
    level: str  # one of LEVELS, or NOT_CERTIFIED
    size: int | None = None
    build_s: float | None = None
    fetched: int | None = None
    from_cache: int | None = None
    certify_s: float | None = None
    checks: str = ""
    reasons: tuple[str, ...] = ()
    measures: tuple[Measure, ...] = ()
    gpus: str = ""
    reference: str | None = None  # registry/repo@sha256:... of the last push of this certificate
    registry_digest: str | None = None
    publish_note: str = ""
    certified_at: str = ""
    links: tuple[Link, ...] = ()

    @property
    def short(self) -> str:
        """The tag without its repository: what fits in a grid cell."""
        return self.tag.rsplit("/", 1)[-1]

    @property
    def built(self) -> bool:
        return self.status != NOT_BUILT


@dataclass(frozen=True, kw_only=True)
class Grid:
    """One framework's table: CUDA lines down, Pythons across, the entries of each pair in its cell."""

    framework: str
    pythons: tuple[str, ...]
    rows: tuple[tuple[str, tuple[tuple[Entry, ...], ...]], ...]  # (cuda, entries per python)


@dataclass(frozen=True, kw_only=True)
class Report:
    entries: tuple[Entry, ...]
    grids: tuple[Grid, ...]
    counts: dict[str, int]
    plot_png: bytes | None
    plot_note: str
    state: str
    generated: str

    @property
    def built(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.built)


# ------------------------------------------------------------------------------------------ reading
def _version_key(text: str) -> tuple[int, Version | str]:
    try:
        return (0, Version(text))
    except InvalidVersion:
        return (1, text)


def _cuda_key(cuda: str) -> tuple[int, Version | str]:
    return (-1, "") if cuda == "cpu" else _version_key(cuda)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _measures(certificate: dict[str, Any]) -> tuple[Measure, ...]:
    out = []
    for check in certificate.get("checks") or []:
        if not isinstance(check, dict) or check.get("name") not in LOSS_CHECKS:
            continue
        values = check.get("values") or {}
        first, last = _number(values.get("first_loss")), _number(values.get("last_loss"))
        if first is not None and last is not None:
            mark = "" if check.get("status") == "pass" else f" ({check.get('status')})"
            out.append(Measure(label=LOSS_CHECKS[str(check["name"])], value=f"{first:.3g} → {last:.3g}{mark}"))
    inventory = certificate.get("inventory") or {}
    matmul = inventory.get("matmul_tflops") if isinstance(inventory, dict) else None
    if isinstance(matmul, dict) and _number(matmul.get("tflops")) is not None:
        size = f"{matmul.get('n')}³ " if matmul.get("n") else ""
        out.append(Measure(label="GPU matmul",
                           value=f"{float(matmul['tflops']):,.1f} TFLOP/s, {size}{matmul.get('dtype', '')}".strip()))
    return tuple(out)


def _check_counts(checks: Iterable[Any]) -> str:
    statuses = [c.get("status") for c in checks if isinstance(c, dict)]
    parts = [f"{statuses.count(s)} {word}" for s, word in (("pass", "passed"), ("fail", "failed"),
                                                           ("skip", "skipped")) if statuses.count(s)]
    return ", ".join(parts)


def _gpus(certificate: dict[str, Any]) -> str:
    gpus = (certificate.get("host") or {}).get("gpus") or (certificate.get("inventory") or {}).get("gpus") or []
    names = [str(g.get("name")) for g in gpus if isinstance(g, dict) and g.get("name")]
    if not names:
        return ""
    first = names[0]
    return f"{len(names)} x {first}" if names.count(first) == len(names) else ", ".join(names)


def _copy(source: Path | None, out: Path, relative: str) -> str | None:
    """Copy `source` to out/relative; the relative link, or None when there is nothing to copy."""
    if source is None or not source.is_file():
        return None
    target = out / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return relative


def _sbom_source(state: State, certificate: dict[str, Any]) -> Path | None:
    """The SBOM beside the certificate, only if it is inside the state folder (a certificate is data)."""
    path = (certificate.get("sbom") or {}).get("path") if isinstance(certificate.get("sbom"), dict) else None
    if not path:
        return None
    candidate = Path(str(path)).resolve()
    return candidate if candidate.is_relative_to(state.root.resolve()) else None


def entry(state: State, tag: str, claims: dict[str, Any], out: Path | None) -> Entry:
    """What `state` knows of one cell; with `out`, its log and certificate are copied there and linked."""
    record = state.read_record(tag)
    certificate = state.read_certificate(tag)
    publish = state.read_publish(tag)
    indexed = state.index().get(tag)
    cert = certificate or {}
    status = NOT_BUILT
    if record is not None:
        status = "built"
        cert_image = (cert.get("image") or {}).get("id")
        if certificate is not None and cert_image and cert_image != record.get("image_id"):
            status = "rebuilt since certified"
    elif certificate is not None:
        status = "pulled"
    level = str(cert.get("level")) if cert.get("level") in LEVELS else NOT_CERTIFIED
    reference, registry_digest, note = None, None, ""
    if publish is not None:
        if certificate is not None and publish.certificate_digest == cert.get("digest"):
            reference, registry_digest = publish.reference, publish.digest
        else:
            note = f"pushed {publish.time} with an older certificate; not pushed since"
    elif indexed is not None and indexed.published is not None and indexed.published.certificate_digest == \
            cert.get("digest"):
        reference, registry_digest = indexed.published.reference, indexed.published.digest
    links: list[Link] = []
    if out is not None:
        folder = f"files/{safe_name(tag)}"
        for label, source, name in (
            ("build log", state.log_path(tag) if record is not None else None, "build.log"),
            ("certify log", state.log_path(tag, "certify") if certificate is not None else None, "certify.log"),
            ("certificate", state.certificate_path(tag) if certificate is not None else None, "certificate.json"),
            ("SBOM", _sbom_source(state, cert), "sbom.cdx.json"),
        ):
            href = _copy(source, out, f"{folder}/{name}")
            if href is not None:
                links.append(Link(label=label, href=href))
    run = cert.get("run") or {}
    rec = record or {}
    return Entry(
        tag=tag, framework=str(claims.get("framework", "?")), version=str(claims.get("version", "?")),
        cuda=str(claims.get("cuda") or "cpu"), python=str(claims.get("python", "?")),
        flavor=str(claims.get("flavor", "")), base=str((claims.get("base") or {}).get("name", "")),
        status=status, level=level,
        size=int(rec["size"]) if _number(rec.get("size")) else None,
        build_s=_number(rec.get("seconds")),
        fetched=int(rec["upstream_bytes"]) if _number(rec.get("upstream_bytes")) is not None else None,
        from_cache=int(rec["cached_bytes"]) if _number(rec.get("cached_bytes")) is not None else None,
        certify_s=_number(run.get("seconds")) if isinstance(run, dict) else None,
        checks=_check_counts(cert.get("checks") or []),
        reasons=tuple(str(r) for r in (cert.get("reasons") or [])[:3]),
        measures=_measures(cert), gpus=_gpus(cert),
        reference=reference, registry_digest=registry_digest, publish_note=note,
        certified_at=str(cert.get("time", "")), links=tuple(links),
    )


def _claims_of(state: State, tag: str) -> dict[str, Any] | None:
    for source in (state.read_record(tag), state.read_certificate(tag)):
        if source is not None and isinstance(source.get("cell"), dict):
            return dict(source["cell"])
    return None


def collect(state: State, cells: list[Cell], selection: Selection, out: Path | None = None) -> list[Entry]:
    """Every selected cell of the matrix, plus any cell the state holds that the matrix no longer has."""
    entries = {c.tag: entry(state, c.tag, c.claims(), out) for c in cells}
    known = {str(r.get("tag")) for r in state.records()} | set(state.index())
    for tag in sorted(known - set(entries)):
        claims = _claims_of(state, tag)
        if claims is None:
            continue
        if selection.matches_fields(framework=str(claims.get("framework")), version=str(claims.get("version")),
                                    cuda=str(claims.get("cuda") or "cpu"), python=str(claims.get("python")),
                                    flavor=str(claims.get("flavor")), tag=tag):
            entries[tag] = entry(state, tag, claims, out)
    return sorted(entries.values(), key=lambda e: (e.framework, _cuda_key(e.cuda), _version_key(e.python),
                                                  _version_key(e.version), e.flavor, e.tag))


def grids(entries: list[Entry]) -> list[Grid]:
    out = []
    for framework in sorted({e.framework for e in entries}):
        mine = [e for e in entries if e.framework == framework]
        pythons = tuple(sorted({e.python for e in mine}, key=_version_key))
        rows = []
        for cuda in sorted({e.cuda for e in mine}, key=_cuda_key):
            per = tuple(tuple(sorted((e for e in mine if e.cuda == cuda and e.python == py),
                                     key=lambda e: (_version_key(e.version), e.flavor, e.base), reverse=True))
                        for py in pythons)
            rows.append((cuda, per))
        out.append(Grid(framework=framework, pythons=pythons, rows=tuple(rows)))
    return out


# ------------------------------------------------------------------------------------------ drawing
def plot(entries: list[Entry]) -> tuple[bytes | None, str]:
    """A PNG of image size and build time per built cell, or None and why not."""
    measured = [e for e in entries if e.size is not None or e.build_s is not None]
    if not measured:
        return None, "no cell has a build record yet, so there is nothing to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return None, f"the plot needs matplotlib, which is not installed: {PLOT_HINT}"
    labels = [e.tag.rsplit("/", 1)[-1] for e in measured]
    colors = [LEVEL_COLORS.get(e.level, LEVEL_COLORS[NOT_CERTIFIED]) for e in measured]
    height = max(2.2, 0.34 * len(measured) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(12, height), dpi=110)
    ys = list(range(len(measured)))
    left.barh(ys, [(e.size or 0) / 1e9 for e in measured], color=colors)
    left.set_xlabel("image size (GB)")
    left.set_yticks(ys, labels, fontsize=8)
    left.invert_yaxis()
    right.barh(ys, [(e.build_s or 0) / 60 for e in measured], color=colors)
    right.set_xlabel("build time (min)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Image size and build time per cell (colour: certification level)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), ""


LEVEL_COLORS = {"gpu-certified": "#1a7f37", "cpu-verified": "#0969da", "failed": "#cf222e",
                NOT_CERTIFIED: "#bf8700", NOT_BUILT: "#8c959f"}


def _mb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _short_digest(digest: str | None) -> str:
    return f"{digest[:17]}…" if digest else "-"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("builder", "report_templates"),
                             autoescape=jinja2.select_autoescape(["html", "html.j2"], default=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(mb=_mb, seconds=_seconds, short_digest=_short_digest,
                       clip=lambda text: text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…")
    env.globals.update(level_colors=LEVEL_COLORS, NOT_BUILT=NOT_BUILT)
    return env


def _md(text: object) -> str:
    """One Markdown table cell: no pipes or line breaks from the data."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def summary_markdown(report: Report) -> str:
    counts = ", ".join(f"{n} {label}" for label, n in report.counts.items() if n)
    lines = ["## builder report", "", f"{len(report.entries)} cells: {counts or 'none'}.", ""]
    built = report.built
    if not built:
        lines.append(f"Nothing has been built in `{report.state}` yet: run `python -m builder build` "
                     "and `python -m builder certify`, then the report again.")
        return "\n".join(lines) + "\n"
    lines += ["| cell | level | status | size | build | fetched | key measures | registry digest |",
              "|---|---|---|---:|---:|---:|---|---|"]
    for e in built:
        measures = "; ".join(f"{m.label} {m.value}" for m in e.measures) or "-"
        digest = f"`{e.registry_digest}`" if e.registry_digest else "-"
        lines.append("| " + " | ".join(_md(x) for x in (
            f"`{e.tag}`", f"**{e.level}**", e.status, _mb(e.size), _seconds(e.build_s), _mb(e.fetched), measures,
            digest)) + " |")
    failed = [e for e in built if e.level == "failed"]
    if failed:
        lines += ["", "### Failed", ""]
        lines += [f"- `{e.tag}`: {_md('; '.join(e.reasons) or 'see its certificate')}" for e in failed]
    if report.plot_note:
        lines += ["", f"Plot: {report.plot_note}."]
    return "\n".join(lines) + "\n"


def make(state: State, cells: list[Cell], selection: Selection, out: Path) -> Report:
    """Read the state, write index.html, summary.md and (where matplotlib is installed) plot.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "files").is_dir():
        shutil.rmtree(out / "files")  # links point at this run's copies only
    entries = collect(state, cells, selection, out)
    png, note = plot(entries)
    counts = {label: sum(e.level == label and e.built for e in entries)
              for label in ("gpu-certified", "cpu-verified", "failed", NOT_CERTIFIED)}
    counts[NOT_BUILT] = sum(not e.built for e in entries)
    report = Report(entries=tuple(entries), grids=tuple(grids(entries)), counts=counts, plot_png=png,
                    plot_note=note, state=str(state.root),
                    generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    plot_path = out / "plot.png"
    if png is not None:
        plot_path.write_bytes(png)
    elif plot_path.exists():
        plot_path.unlink()
    html = environment().get_template("index.html.j2").render(
        report=report, version=__version__,
        plot_uri="data:image/png;base64," + base64.b64encode(png).decode("ascii") if png else None)
    (out / "index.html").write_text(html, encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(report), encoding="utf-8")
    return report
