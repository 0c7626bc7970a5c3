"""Publish and consume certified images: push to a registry, resolve pinned references, pull and verify.

- push: only an image whose certificate matches it (the stamped label carries the certificate's
  digest, and its parent is the tested image the certificate names; or, for an image that `pull`
  brought here, its source registry still holds this very image with this certificate beside it,
  which the push records as where it was mirrored from), at the required level. The
  image goes under its cell tag, a tag that is never moved (content hash + certificate digest) and
  its aliases; the certificate goes beside it as an OCI artifact (`sha256-<hex>.cert`). Only then is
  the registry digest recorded, beside the certificate (index.json and publish/<tag>.json).
- resolve: asks the registry, not local state, for each cell's digest and checks the certificate
  that travels with it.
- pull: pulls by digest and checks the image against that certificate; --recertify runs the smoke
  payload again and compares.

The tool's own registry client speaks HTTPS or HTTP as the engine would (`open_registry`).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from builder import tags
from builder.certify import CertifyOptions, certify_cells, digest
from builder.engine import CERT_DIGEST, HASH, LEVEL, TAG, Engine, ImageInfo
from builder.errors import BuilderError, EngineError, NotCertified, RegistryError
from builder.matrix.model import Cell, Matrix
from builder.registry import Registry, cert_tag, engine_insecure, split_reference, with_retries
from builder.state import PublishRecord, State, level_at_least

log = logging.getLogger("builder")


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where one cell goes in a registry."""

    cell: Cell
    registry: str  # host[:port][/namespace]
    repository: str  # registry/namespace/builder/torch
    tag: str  # the cell's own tag part: 2.4.1-cuda12.1-...

    @property
    def host(self) -> str:
        return self.registry.split("/", 1)[0]

    @property
    def path(self) -> str:
        """The repository path inside the registry (what the HTTP API calls `name`)."""
        return self.repository.split("/", 1)[1]

    def ref(self, tag: str | None = None) -> str:
        return f"{self.repository}:{tag or self.tag}"


def target(cell: Cell, registry: str) -> Target:
    local_repo, _, tag = cell.tag.rpartition(":")
    return Target(cell=cell, registry=registry, repository=tags.remote_repository(registry, local_repo), tag=tag)


@dataclass(frozen=True, kw_only=True)
class PushResult:
    cell: Cell
    status: str  # pushed, unchanged, refused, failed
    reference: str | None = None
    tags: tuple[str, ...] = ()
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pushed", "unchanged")


def open_registry(registry_name: str, engine: Engine | None) -> Registry:
    """A client for the registry's host that speaks HTTPS or plain HTTP as `engine` does.

    The engine moves the image and this client the certificate, so both must agree: a registry the
    engine treats as insecure (`docker info` RegistryConfig) is insecure here too, and one it treats as
    secure is never downgraded. With no engine, only loopback is insecure.
    """
    host = registry_name.split("/", 1)[0]
    config = engine.info().get("RegistryConfig") if engine is not None else None
    return Registry(host, insecure=engine_insecure(host, config if isinstance(config, dict) else None))


def _any_engine() -> Engine | None:
    """The engine DOCKER_HOST or the docker context names, if one answers: only its registry settings are read."""
    try:
        return Engine.connect(timeout=10)
    except EngineError as exc:
        log.debug("no engine to ask for its insecure registries (%s): only loopback is plain HTTP", exc)
        return None


def pulled_from(image: ImageInfo, cert: dict[str, Any],
                registries: Callable[[str], Registry]) -> tuple[str | None, str]:
    """The registry reference a pulled image came from, confirmed by that registry now; else None and why.

    A pulled image has no local parent to show what certify tested. What stands in for it is what
    `pull` checked, asked again: one of the references the engine pulled it as (`repo@sha256:...`)
    still names a manifest whose config is this very image, with this certificate beside it.
    """
    if not image.repo_digests:
        return None, "it came from no registry either (the engine has no repo digest for it)"
    problems = []
    for ref in image.repo_digests:
        host, path, digest_ = split_reference(ref)
        try:
            registry = registries(host)
            manifest = registry.manifest(path, digest_)
            config = (manifest.data.get("config") or {}).get("digest") if manifest is not None else None
            found = registry.certificate(path, digest_) if config == image.id else None
        except RegistryError as exc:
            problems.append(f"{ref}: {exc}")
            continue
        if manifest is None:
            problems.append(f"{ref} is no longer in its registry")
        elif config != image.id:
            problems.append(f"{ref} is now another image")
        elif found is None or found[0].get("digest") != cert["digest"]:
            problems.append(f"{ref} has {'no' if found is None else 'another'} certificate beside it")
        else:
            return ref, ""
    return None, "the registry it was pulled from cannot confirm it: " + "; ".join(problems)


@dataclass(frozen=True, kw_only=True)
class Pushable:
    """What check_certified found: the image, its certificate (None when pushed uncertified), its source."""

    image: ImageInfo
    cert: dict[str, Any] | None
    mirrored_from: str | None = None  # registry/repo@sha256:... a pulled image was confirmed against


def check_certified(engine: Engine, state: State, cell: Cell, require: str, allow_uncertified: bool,
                    registries: Callable[[str], Registry] | None = None) -> Pushable:
    """The stamped image and its certificate, or NotCertified saying in one line why it may not be pushed.

    `registries` opens a client for a host; with it, an image that `pull` brought here (no local
    parent) is pushable when its source registry confirms it (see pulled_from).
    """
    image = engine.image(cell.tag)
    if image is None:
        raise NotCertified(f"{cell.tag}: no such image here: run `python -m builder build` and `certify` first")
    cert = state.read_certificate(cell.tag)
    problem = None
    source = None
    if cert is None:
        problem = f"no certificate in {state.certificates_dir}: run `python -m builder certify`"
    elif digest(cert) != cert.get("digest"):
        problem = f"{state.certificate_path(cell.tag)} was changed after certify (its digest no longer matches)"
    elif image.labels.get(CERT_DIGEST) != cert["digest"]:
        problem = (f"the image carries certificate {str(image.labels.get(CERT_DIGEST, 'none'))[:19]}, not "
                   f"{cert['digest'][:19]} from {state.certificate_path(cell.tag)}: the image or the certificate "
                   "changed since certify; run `python -m builder certify` again")
    elif image.parent == "" and registries is not None and verify_certificate(cert, image.labels, cell.tag) is None:
        source, why = pulled_from(image, cert, registries)
        if source is None:
            problem = (f"no local parent shows what was tested, and {why}: for a pulled image make its source "
                       "registry reachable (and `docker login` to it), or run `python -m builder certify` here")
    elif image.parent != cert["image"]["id"]:
        problem = (f"the image is not stamped on the tested image {cert['image']['id'][:19]} the certificate names: "
                   "run `python -m builder certify` again")
    if problem is None and cert is not None and not level_at_least(str(cert.get("level")), require):
        problem = f"certified {cert.get('level')}, below the required {require}"
    if problem is None:
        return Pushable(image=image, cert=cert, mirrored_from=source)
    if allow_uncertified:
        log.warning("%s: --allow-uncertified: pushing anyway: %s", cell.tag, problem)
        return Pushable(image=image, cert=None)
    raise NotCertified(f"{cell.tag}: not pushed: {problem} (--allow-uncertified overrides)")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def push_one(engine: Engine, registry: Registry, state: State, dest: Target, *, require: str,
             allow_uncertified: bool, aliases: tuple[str, ...] = (),
             registries: Callable[[str], Registry] | None = None) -> PushResult:
    """Push one cell's image, its tags and its certificate; record the digest only once all of it is in."""
    started = time.monotonic()
    cell = dest.cell
    found = check_certified(engine, state, cell, require, allow_uncertified, registries)
    image, cert = found.image, found.cert
    names = [dest.tag, *aliases]
    if cert is not None:
        names.insert(1, tags.immutable_tag(str(cert["image"]["content_hash"]), str(cert["digest"])))
    before = {n: (m.digest if (m := registry.manifest(dest.path, n)) is not None else None) for n in names}
    if _holds(registry, dest, before, image.id):
        pushed = dict(before)  # the registry already has this very image under every name: send nothing
    else:
        pushed = {n: _push_tag(engine, image.id, dest.ref(n)) for n in names}
    digests = set(pushed.values())
    if len(digests) != 1:
        raise RegistryError(f"{dest.registry}: the tags of {cell.tag} got different digests: "
                            f"{sorted(map(str, digests))}")
    image_digest = str(digests.pop())
    manifest = registry.manifest(dest.path, image_digest)
    if manifest is None:
        raise RegistryError(f"{dest.registry}: {dest.repository}@{image_digest} is not there after the push")
    artifact = None
    had_artifact = False
    if cert is not None:
        existing = registry.certificate(dest.path, image_digest)
        had_artifact = existing is not None and existing[0].get("digest") == cert["digest"]
        if had_artifact:
            artifact = cert_tag(image_digest)
        else:
            body = state.certificate_path(cell.tag).read_bytes()
            artifact, _ = registry.push_certificate(dest.path, manifest, body, _now())
    unchanged = all(d == image_digest for d in before.values()) and (cert is None or had_artifact)
    reference = f"{dest.repository}@{image_digest}"
    seconds = time.monotonic() - started
    if cert is not None:  # an uncertified push is never recorded as a certified one
        state.write_publish(PublishRecord(
            tag=cell.tag, registry=dest.registry, repository=dest.repository, digest=image_digest,
            reference=reference, tags=tuple(names), certificate_digest=str(cert["digest"]),
            certificate_artifact=artifact, image_id=image.id, noop=unchanged, seconds=round(seconds, 1),
            time=_now(), extra={"mirrored_from": found.mirrored_from} if found.mirrored_from else {}))
    status = "unchanged" if unchanged else "pushed"
    detail = "already in the registry (same manifest digest)" if unchanged else f"tags {', '.join(names)}"
    if found.mirrored_from:
        detail += f"; mirrored from {found.mirrored_from}, which holds it with this certificate"
    if cert is None:
        detail += "; uncertified (--allow-uncertified): no certificate pushed, nothing recorded"
    return PushResult(cell=cell, status=status, reference=reference, tags=tuple(names), seconds=seconds,
                      detail=detail)


def _holds(registry: Registry, dest: Target, before: dict[str, str | None], image_id: str) -> bool:
    """Whether every name already points at one manifest whose config is this very image.

    An image's id is the digest of its configuration, which the manifest names: no local record of an
    earlier push is needed (the engine forgets the repo digest once the registry's name is dropped).
    """
    digests = set(before.values())
    if len(digests) != 1 or None in digests:
        return False
    manifest = registry.manifest(dest.path, str(digests.pop()))
    config = (manifest.data.get("config") or {}).get("digest") if manifest is not None else None
    return config == image_id


def _push_tag(engine: Engine, image_id: str, ref: str) -> str:
    """Name the image `ref`, push it (retrying transient failures), and drop the name again."""
    engine.tag(image_id, ref)
    try:
        return with_retries(lambda: engine.push(ref))
    finally:
        engine.untag(ref)  # the registry's name was only needed for the push


def push_cells(engine: Engine, cells: list[Cell], state: State, registry_name: str, *, require: str,
               allow_uncertified: bool, aliases: dict[str, tuple[str, ...]] | None = None) -> list[PushResult]:
    """Push each cell; a cell that may not be pushed, or whose push fails, is one line and records nothing."""
    registry = open_registry(registry_name, engine)
    registry.ping()  # one clear line for a registry that is down, elsewhere, or wants a login
    sources: dict[str, Registry] = {registry.host: registry}

    def registries(host: str) -> Registry:  # the registries pulled images came from, opened once each
        if host not in sources:
            sources[host] = open_registry(host, engine)
        return sources[host]

    results = []
    for cell in cells:
        dest = target(cell, registry_name)
        started = time.monotonic()
        try:
            results.append(push_one(engine, registry, state, dest, require=require,
                                    allow_uncertified=allow_uncertified, aliases=(aliases or {}).get(cell.tag, ()),
                                    registries=registries))
        except NotCertified as exc:
            results.append(PushResult(cell=cell, status="refused", detail=str(exc)))
        except RegistryError as exc:
            results.append(PushResult(cell=cell, status="failed", seconds=time.monotonic() - started,
                                      detail=str(exc)))
        if results[-1].ok:  # a failure is said once, as the error line
            log.info("%s: %s: %s", cell.tag, results[-1].status, results[-1].detail)
    return results


# ------------------------------------------------------------------------------------------ resolve
@dataclass(frozen=True, kw_only=True)
class Resolved:
    cell: Cell
    reference: str | None  # registry/repo@sha256:..., None where not found or not certified
    level: str = ""
    certificate: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.reference is not None and self.problem is None


def resolve_one(registry: Registry, dest: Target, require: str) -> Resolved:
    """Ask the registry for the cell's digest, and check the certificate pushed beside it."""
    cell = dest.cell
    manifest = registry.manifest(dest.path, dest.tag)
    if manifest is None:
        return Resolved(cell=cell, reference=None, problem=f"{dest.ref()} is not in the registry: push it first")
    reference = f"{dest.repository}@{manifest.digest}"
    found = registry.certificate(dest.path, manifest.digest)
    if found is None:
        return Resolved(cell=cell, reference=None, problem=f"{reference} has no certificate beside it "
                        f"({cert_tag(manifest.digest)}): it was pushed uncertified")
    cert, _ = found
    labels = (registry.image_config(dest.path, manifest).get("config") or {}).get("Labels") or {}
    problem = verify_certificate(cert, labels, cell.tag)
    if problem is None and not level_at_least(str(cert.get("level")), require):
        problem = f"{reference} is certified {cert.get('level')}, below the required {require}"
    return Resolved(cell=cell, reference=reference if problem is None else None, level=str(cert.get("level")),
                    certificate=cert, problem=problem)


def verify_certificate(cert: dict[str, Any], labels: dict[str, str], tag: str) -> str | None:
    """Why an image's labels do not match its certificate, or None: digest, level, content hash, tag."""
    if digest(cert) != cert.get("digest"):
        return "its certificate's body does not match the certificate's own digest"
    if labels.get(CERT_DIGEST) != cert["digest"]:
        return (f"the image carries certificate {labels.get(CERT_DIGEST, 'none')}, but the certificate beside it "
                f"is {cert['digest']}")
    if labels.get(LEVEL) != cert.get("level"):
        return f"the image is labelled {labels.get(LEVEL)}, its certificate says {cert.get('level')}"
    if labels.get(HASH) != (cert.get("image") or {}).get("content_hash"):
        return "the image's content hash is not the one its certificate names"
    if labels.get(TAG) not in (None, tag):
        return f"the image was built as {labels.get(TAG)}, not {tag}"
    return None


def resolve_cells(cells: list[Cell], registry_name: str, require: str,
                  engine: Engine | None = None) -> list[Resolved]:
    """Ask the registry for each cell; the engine (given, or the one configured, if it answers) is asked
    only whether it treats the registry as insecure."""
    registry = open_registry(registry_name, engine or _any_engine())
    registry.ping()
    return [resolve_one(registry, target(cell, registry_name), require) for cell in cells]


def env_key(cell: Cell) -> str:
    """A shell-safe variable name for a cell: BUILDER_IMAGE_TENSORFLOW_2_18_0_CPU_PY3_11_RUNTIME_DEBIAN12."""
    name = cell.tag.rsplit("/", 1)[-1]
    return "BUILDER_IMAGE_" + re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")


def format_resolved(found: list[Resolved], fmt: str) -> str:
    good = [r for r in found if r.ok]
    if fmt == "json":
        return json.dumps([{"tag": r.cell.tag, "reference": r.reference, "level": r.level,
                            "certificate": r.certificate.get("digest")} for r in good], indent=2)
    if fmt == "env":
        return "\n".join(f"{env_key(r.cell)}={r.reference}" for r in good)
    return "\n".join(str(r.reference) for r in good)


# --------------------------------------------------------------------------------------------- pull
@dataclass(frozen=True, kw_only=True)
class PullResult:
    cell: Cell
    status: str  # verified, recertified, failed
    reference: str | None = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("verified", "recertified")


def compare_certificates(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What a re-certification found differently: the level and each check's status."""
    diffs = []
    if old.get("level") != new.get("level"):
        diffs.append(f"level {old.get('level')} -> {new.get('level')}")
    before = {c["name"]: c.get("status") for c in old.get("checks") or []}
    after = {c["name"]: c.get("status") for c in new.get("checks") or []}
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            diffs.append(f"{name} {before.get(name, 'absent')} -> {after.get(name, 'absent')}")
    return diffs


def pull_one(engine: Engine, registry: Registry, state: State, dest: Target, *, require: str,
             recertify: bool, certify_options: CertifyOptions | None = None) -> PullResult:
    started = time.monotonic()
    cell = dest.cell
    found = resolve_one(registry, dest, require)
    if not found.ok or found.reference is None:
        return PullResult(cell=cell, status="failed", detail=str(found.problem))
    reference = found.reference
    info = with_retries(lambda: engine.pull_digest(reference))
    problem = verify_certificate(found.certificate, info.labels, cell.tag)
    if problem is not None:
        engine.untag(reference)  # leave nothing behind that failed its check
        return PullResult(cell=cell, status="failed", reference=reference, detail=f"{reference}: {problem}")
    engine.tag(info.id, cell.tag)  # build, certify and `docker run` find it under the cell's own name
    state.write_certificate(cell.tag, found.certificate)
    state.index_certificate(cell.tag, found.certificate)
    detail = f"{found.level}; labels, content hash and certificate digest match"
    if not recertify:
        return PullResult(cell=cell, status="verified", reference=reference, detail=detail,
                          seconds=time.monotonic() - started)
    new, summary = recertify_pulled(engine, cell, info, certify_options)
    diffs = compare_certificates(found.certificate, new) if new is not None else [f"the re-run failed: {summary}"]
    if diffs:
        return PullResult(cell=cell, status="failed", reference=reference, seconds=time.monotonic() - started,
                          detail="re-certification disagrees: " + "; ".join(diffs[:6]))
    checks = len(new.get("checks") or []) if new else 0
    return PullResult(cell=cell, status="recertified", reference=reference, seconds=time.monotonic() - started,
                      detail=f"{found.level} again, {checks} checks agree with the pushed certificate")


def recertify_pulled(engine: Engine, cell: Cell, pulled: ImageInfo,
                     options: CertifyOptions | None) -> tuple[dict[str, Any] | None, str]:
    """Run certify on the pulled image in a scratch state, and put the cell's name back on the pulled image.

    Returns the new certificate (None if the run wrote none) and certify's one-line summary.
    """
    with tempfile.TemporaryDirectory(prefix="builder-recertify-") as tmp:
        base = options or CertifyOptions(state_dir=Path(tmp))
        opts = CertifyOptions(**{**base.__dict__, "state_dir": Path(tmp), "force": True, "image": pulled.id})
        summary = "certify did not run"
        try:
            summary = certify_cells(engine, [cell], opts)[0].summary
        finally:
            stamped = engine.image(cell.tag)
            engine.tag(pulled.id, cell.tag)
            if stamped is not None and stamped.id != pulled.id:  # the scratch stamp is not kept
                engine.untag(stamped.id)
        return State(Path(tmp)).read_certificate(cell.tag), summary


def pull_cells(engine: Engine, cells: list[Cell], state: State, registry_name: str, *, require: str,
               recertify: bool, certify_options: CertifyOptions | None = None) -> list[PullResult]:
    registry = open_registry(registry_name, engine)
    registry.ping()
    results = []
    for cell in cells:
        try:
            results.append(pull_one(engine, registry, state, target(cell, registry_name), require=require,
                                    recertify=recertify, certify_options=certify_options))
        except BuilderError as exc:
            results.append(PullResult(cell=cell, status="failed", detail=str(exc)))
        if results[-1].ok:  # a failure is said once, as the error line
            log.info("%s: %s: %s", cell.tag, results[-1].status, results[-1].detail)
    return results


def aliases_for(matrix: Matrix, cells: list[Cell]) -> dict[str, tuple[str, ...]]:
    """The alias tags (from the matrix's `aliases:`) that each selected cell carries."""
    from builder.matrix import expand
    from builder.matrix.aliases import assign

    chosen = assign(matrix, expand(matrix)[0])  # "newest" is judged over the whole matrix, not the selection
    return {c.tag: chosen.get(c.tag, ()) for c in cells}
