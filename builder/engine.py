"""The one place that talks to the container engine (Docker, through its Python SDK).

Everything else asks this module for images, builds and runs; a BuildKit backend would replace this
file only. Containers are created, started and removed explicitly, by image id, so nothing is ever
pulled by accident or left behind.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import platform
import posixpath
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.types import DeviceRequest
from docker.utils import parse_repository_tag

from builder.errors import BuildFailed, EngineError, EngineGone, Interrupted
from builder.gpu import NO_DEVICE_DRIVER, QUERY, DriverProbe, parse_nvidia_smi
from builder.labels import CERT_DIGEST, CLAIM, HASH, LEVEL, MANAGED, OWNER, OWNER_HOST, OWNER_PID, SESSION, TAG

__all__ = ["CERT_DIGEST", "HASH", "LEVEL", "MANAGED", "SESSION", "TAG"]  # re-exported: defined in labels

log = logging.getLogger("builder")

# A build step may print nothing for this long (committing a multi-GB layer) before we call it hung.
BUILD_SILENCE_S = 3600


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    labels: dict[str, str]
    size: int
    user: str
    env: tuple[str, ...]
    parent: str  # the classic builder's parent image id, "" for none
    created: str
    repo_digests: tuple[str, ...] = ()  # registry/repo@sha256:... the engine pulled or pushed it as


@dataclass(frozen=True, kw_only=True)
class RunResult:
    exit_code: int | None  # None: killed at the timeout
    logs: str
    files: dict[str, bytes]
    seconds: float


@dataclass(frozen=True, kw_only=True)
class GpuRequest:
    """GPUs for one container: `count` -1 for all; `cdi` names CDI devices where that is the engine's only way."""

    count: int
    cdi: bool = False

    def device_requests(self) -> list[DeviceRequest]:
        if self.cdi:
            ids = ["nvidia.com/gpu=all"] if self.count < 0 else [f"nvidia.com/gpu={i}" for i in range(self.count)]
            return [DeviceRequest(driver="cdi", device_ids=ids)]
        return [DeviceRequest(count=self.count, capabilities=[["gpu"]])]


def _tar(files: dict[str, bytes]) -> bytes:
    """A tar of `files` (path -> bytes) with fixed metadata, so equal files give equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(files[name])
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


# ------------------------------------------------------------------------------ claims, leases, sweep
# Two runs (processes, or hosts sharing one engine) must not build or certify the same content at once, and what a
# run that died left on the engine must be found and removed by the next one. Both are decided on the engine:
# - a *lease* is one running container per process (`cat` on a stdin the process holds open): when the process
#   dies, however it dies and wherever it runs, the engine closes that stdin and the lease exits; when the engine
#   dies, the lease is not running after it restarts;
# - a *claim* is a created (never started) container named for the work and its content hash: creating a name is
#   atomic on the engine, so a second run gets 409 Conflict and waits;
# - everything a run creates carries its owner label, and a claim holds the ids of the step containers and images
#   its build made (the classic builder's own, which take no label), so a stopped run's leftovers are exactly known.
# A run whose lease is not running is dead: its claims, containers and recorded images are stale and safe to remove.
CLAIM_PREFIX = "builder-claim-"
LEASE_PREFIX = "builder-lease-"
LEASE_GRACE_S = 300.0  # a lease created but not started for this long: its process died between the two calls
MADE_FILE = "builder-made.json"  # in a claim container: what its build made
CLAIM_KINDS = ("build", "certify")
_HEX = re.compile(r"[0-9a-f]{16,64}")
_ID = re.compile(r"[0-9a-f]{12,64}")  # a container or image id, as short as the classic builder prints them
NO_SPACE = "no space left on device"


def claim_name(kind: str, key: str) -> str:
    """The engine-wide name of the claim on one piece of work: its kind and its content hash (or image id)."""
    digest = key.removeprefix("sha256:")
    if kind not in CLAIM_KINDS or not _HEX.fullmatch(digest):
        raise ValueError(f"no claim name for {kind!r} {key!r}: a kind from {CLAIM_KINDS} and a hex digest")
    return f"{CLAIM_PREFIX}{kind}-{digest[:40]}"


def lease_alive(status: str, created: float, now: float) -> bool:
    """Whether a lease container shows its process alive: running, or created moments ago and being started."""
    if status in ("running", "restarting", "paused"):
        return True
    return status == "created" and now - created < LEASE_GRACE_S


def live_owners(containers: list[dict[str, Any]], now: float) -> set[str]:
    """The owners (from a container listing) whose lease is alive."""
    return {str(c["Labels"][OWNER]) for c in containers
            if any(str(n).lstrip("/").startswith(LEASE_PREFIX) for n in c.get("Names") or ())
            and OWNER in (c.get("Labels") or {})
            and lease_alive(str(c.get("State", "")), float(c.get("Created") or 0), now)}


def stale(containers: list[dict[str, Any]], now: float, keep: str | None = None) -> list[dict[str, Any]]:
    """The owner-labelled containers whose owner is dead (no live lease); `keep` (this process's owner) never is."""
    alive = live_owners(containers, now) | ({keep} if keep else set())
    return [c for c in containers if OWNER in (c.get("Labels") or {}) and c["Labels"][OWNER] not in alive]


def with_labels(dockerfile: bytes, labels: dict[str, str]) -> bytes:
    """`dockerfile` with one LABEL instruction for `labels` at its end (the last stage's), each key and value
    quoted so that the builder takes it verbatim; any line break in a value becomes a space."""
    if not labels:
        return dockerfile
    if dockerfile.rstrip().endswith(b"\\"):  # the LABEL line would join that instruction, and vanish into it
        raise BuildFailed("the Dockerfile ends inside a continued instruction: no labels can follow it")

    def quoted(text: str) -> str:
        text = " ".join(text.splitlines())
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'

    line = "LABEL " + " ".join(f"{quoted(k)}={quoted(v)}" for k, v in labels.items())
    return dockerfile.rstrip(b"\n") + b"\n" + line.encode() + b"\n"


def owner_of(labels: dict[str, str]) -> str:
    """Who made a container, for people: `host H, pid P`."""
    return f"host {labels.get(OWNER_HOST, '?')}, pid {labels.get(OWNER_PID, '?')}"


def gone(address: str, what: str) -> str:
    """The one line for an engine that stopped answering mid-work."""
    return (f"the engine at {address} stopped answering during {what} (it crashed or was stopped): start it again "
            "and rerun; what this run left on the engine is removed by the next build or certify there")


def full(address: str, root: str | None, what: str) -> str:
    """The one line for an engine whose disk filled up."""
    where = f"its data root {root}" if root else "its data root"
    return (f"the engine at {address} ran out of disk space during {what} (no space left on device in {where}): "
            "free space there (`python -m builder clean`, `docker system prune`) or give the engine a larger data "
            "root, then rerun")


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A claim this process holds on one piece of work; released by its container id, never by its name."""

    name: str
    id: str
    owner: str
    tag: str


@dataclass(frozen=True, kw_only=True)
class Holder:
    """The live run that holds a claim this process could not take."""

    name: str
    id: str
    who: str  # `host H, pid P`


@dataclass(frozen=True, kw_only=True)
class Swept:
    """What a sweep removed, and whose it was."""

    containers: int = 0
    images: int = 0
    owners: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.containers or self.images)


class ContainerEngine(Protocol):
    """What build, certify and bases need of an engine: the Docker SDK below, an in-memory fake in unit tests."""

    address: str

    def image(self, ref: str) -> ImageInfo | None: ...

    def images_with_label(self, key: str, value: str | None = None, all_images: bool = False) -> list[ImageInfo]: ...

    def pull(self, ref: str) -> None: ...

    def import_rootfs(self, stream: Any, ref: str) -> str: ...

    def stamp(self, image_id: str, ref: str, labels: dict[str, str]) -> str: ...

    def tag(self, image_id: str, ref: str) -> None: ...

    def prune_dangling(self, label: str) -> int | None: ...

    def build(self, files: dict[str, bytes], *, tag: str, labels: dict[str, str], on_line: Callable[[str], None],
              stop: threading.Event, nocache: bool = False, build_args: dict[str, str] | None = None) -> str: ...

    def info(self) -> dict[str, Any]: ...

    def gpu_probe(self, image_id: str, request: GpuRequest) -> DriverProbe | None: ...

    def run(self, image_id: str, command: list[str], *, labels: dict[str, str], timeout: float, mem_limit: str,
            gpus: GpuRequest | None = None, env: dict[str, str] | None = None,
            inject: dict[str, bytes] | None = None, fetch: str | None = None,
            stop: threading.Event | None = None) -> RunResult: ...

    def read_file(self, image_id: str, path: str) -> bytes | None: ...

    def files(self, image_id: str) -> AbstractContextManager[Callable[[str], bytes | None]]: ...

    def remove_containers(self, label: str = MANAGED, running: bool = True) -> int: ...

    def remove_container_ids(self, ids: Iterable[str]) -> int: ...

    def remove_image_ids(self, ids: Iterable[str]) -> int: ...

    def claim(self, kind: str, key: str, tag: str, image_id: str) -> Claim | Holder: ...

    def note_made(self, claim: Claim, containers: Iterable[str], images: Iterable[str]) -> None: ...

    def release(self, claim: Claim) -> None: ...

    def sweep(self) -> Swept: ...

    def end_lease(self) -> None: ...


CLAIM_POLL_S = 2.0


@contextmanager
def holding(engine: ContainerEngine, kind: str, key: str, tag: str, image_id: str,
            stop: threading.Event) -> Iterator[tuple[Claim, bool]]:
    """Hold the engine-wide claim on `kind` work on content `key` for the block: (the claim, whether we waited).

    While a live run holds it, wait (saying so once): a run that waited should look again for what the other
    made before doing the work itself. Ctrl-C while waiting is an interrupt like any other.
    """
    waited = False
    while True:
        got = engine.claim(kind, key, tag, image_id)
        if isinstance(got, Claim):
            break
        if not waited:
            log.info("%s: another run (%s) is doing the %s of the same content: waiting for it", tag, got.who, kind)
        waited = True
        if stop.wait(CLAIM_POLL_S):
            raise Interrupted(f"{kind} of {tag} interrupted while waiting for another run")
    try:
        yield got, waited
    finally:
        engine.release(got)


def tidy(engine: ContainerEngine) -> Swept:
    """At the start of a run: remove what runs that died left on the engine, and say so."""
    try:
        swept = engine.sweep()
    except EngineError as exc:  # housekeeping: the run itself will meet the engine's trouble and say it
        log.debug("no sweep: %s", exc)
        return Swept()
    if swept:
        log.info("removed %d container(s) and %d image(s) left on %s by a run that stopped (%s)", swept.containers,
                 swept.images, engine.address, "; ".join(swept.owners) or "its lease is gone")
    return swept


F = TypeVar("F", bound=Callable[..., Any])


def _translated(method: F) -> F:
    """Turn the engine's own failures (API errors, a dropped connection) into one-line EngineErrors."""

    @functools.wraps(method)
    def wrapper(self: Engine, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            what = method.__name__.replace("_", " ")
            if isinstance(exc, requests.exceptions.RequestException) and not self.answers():
                raise EngineGone(gone(self.address, f"`{what}`")) from None
            detail = getattr(exc, "explanation", None) or str(exc)
            raise EngineError(f"the engine at {self.address} failed ({what}): {detail}") from None

    return wrapper  # type: ignore[return-value]


def _address() -> str:
    """DOCKER_HOST, else the current docker context's endpoint, else the default socket."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    try:
        from docker.context import ContextAPI

        ctx = ContextAPI.get_current_context()
        host = ctx.Host if ctx is not None else None
        if host:
            return str(host)
    except Exception:  # a broken docker config must not stop us from trying the default socket
        log.debug("no usable docker context", exc_info=True)
    return "unix:///var/run/docker.sock"


class Engine:
    def __init__(self, client: docker.DockerClient, address: str) -> None:
        self.client = client
        self.api = client.api
        self.address = address
        self._lease_lock = threading.Lock()
        self._owner: str | None = None  # this process's owner id on this engine, while its lease runs
        self._lease_id: str | None = None
        self._lease_socket: Any = None  # held open: the lease lives exactly as long as this process
        self._leaseless = False  # the transport cannot hold a lease's stdin: no claims, no owner labels

    @classmethod
    def connect(cls, timeout: int = 600) -> Engine:
        """Reach the engine, or raise EngineError saying which address was tried and what to do."""
        address = _address()
        try:
            # ssh:// through the OpenSSH client, as the docker CLI does: ~/.ssh/config and the agent apply.
            client = docker.DockerClient(base_url=address, timeout=timeout, use_ssh_client=address.startswith("ssh://"))
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            reason = str(exc).split("(")[0].strip() or type(exc).__name__
            if address.startswith("ssh://") and "paramiko" in reason:  # the SDK imports it even to shell out
                raise EngineError(f"the engine at {address} needs the SDK's ssh support: pip install "
                                  "'builder[ssh]' (paramiko); the connection itself goes through `ssh`") from None
            raise EngineError(
                f"no Docker engine answers at {address} ({reason}): start one (`dockerd &` as root, or "
                "`systemctl start docker`) or point DOCKER_HOST / `docker context use` at one"
            ) from None
        return cls(client, address)

    # --------------------------------------------------------------------------------------- images
    def _info(self, attrs: dict[str, Any]) -> ImageInfo:
        config = attrs.get("Config") or {}
        return ImageInfo(
            id=attrs["Id"],
            tags=tuple(attrs.get("RepoTags") or ()),
            labels=dict(config.get("Labels") or {}),
            size=int(attrs.get("Size") or 0),
            user=str(config.get("User") or ""),
            env=tuple(config.get("Env") or ()),
            parent=str(attrs.get("Parent") or ""),
            created=str(attrs.get("Created") or ""),
            repo_digests=tuple(attrs.get("RepoDigests") or ()),
        )

    def image(self, ref: str) -> ImageInfo | None:
        try:
            return self._info(self.api.inspect_image(ref))  # type: ignore[no-untyped-call]
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine at {self.address} failed to inspect {ref}: {exc.explanation}") from None
        except requests.exceptions.RequestException as exc:
            raise EngineError(f"the engine at {self.address} failed (inspect {ref}): {exc}") from None

    @_translated
    def images_with_label(self, key: str, value: str | None = None, all_images: bool = False) -> list[ImageInfo]:
        """Images carrying the label; all_images also finds untagged parents of other images."""
        flt = f"{key}={value}" if value is not None else key
        found = self.api.images(all=all_images, filters={"label": flt})
        return [info for img in found if (info := self.image(img["Id"])) is not None]

    @_translated
    def history(self, image_id: str) -> list[dict[str, Any]]:
        return list(self.api.history(image_id))  # type: ignore[no-untyped-call]

    def save(self, image_id: str) -> Iterator[bytes]:
        return iter(self.api.get_image(image_id, chunk_size=1 << 20))

    def pull(self, ref: str) -> None:
        """Pull `ref` whole (the SDK splits name, tag and @digest itself); stream errors raise too."""
        try:
            for event in self.api.pull(ref, stream=True, decode=True):
                if "error" in event:
                    raise EngineError(str(event["error"]))
        except docker.errors.APIError as exc:
            raise EngineError(str(exc.explanation or exc)) from None

    @_translated
    def import_rootfs(self, stream: Any, ref: str) -> str:
        repo, tag = parse_repository_tag(ref)
        if tag and tag.startswith("sha256:"):
            raise EngineError(f"cannot import a root filesystem as {ref}: a digest names registry content")
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["bash"]']
        result = self.api.import_image_from_stream(stream, repository=repo, tag=tag, changes=changes)
        info = self.image(ref)
        if info is None:
            raise EngineError(f"importing {ref} failed: {str(result)[-300:]}")
        return info.id

    @_translated
    def stamp(self, image_id: str, ref: str, labels: dict[str, str]) -> str:
        """Commit a thin layer on `image_id` that adds `labels`, and point `ref` at it."""
        repo, tag = parse_repository_tag(ref)
        changes = [f'LABEL {k}="{v}"' for k, v in labels.items()]
        cid = self.api.create_container(image_id, command=["true"], labels=self._owned())["Id"]
        try:
            result = self.api.commit(cid, repository=repo, tag=tag, changes=changes)
        finally:
            self.api.remove_container(cid, force=True)
        return str(result["Id"])

    @_translated
    def tag(self, image_id: str, ref: str) -> None:
        repo, tag = parse_repository_tag(ref)
        self.api.tag(image_id, repo, tag, force=True)

    def prune_dangling(self, label: str) -> int | None:
        """Remove untagged images carrying `label`; returns the bytes freed, or None when another run is live.

        A classic build's latest step image is dangling until the next step: pruning under a running build
        breaks it ("unknown parent image ID"). So nothing is pruned while another run's lease is alive.
        """
        if self._live_owners() - {self._owner}:
            return None
        try:
            pruned = self.api.prune_images(filters={"dangling": True, "label": label})  # type: ignore[no-untyped-call]
        except docker.errors.APIError as exc:
            raise EngineError(f"pruning images failed: {exc.explanation}") from None
        return int(pruned.get("SpaceReclaimed") or 0)

    @_translated
    def remove_images_with_label(self, key: str, value: str) -> int:
        """Remove every image carrying key=value, stamped children before their parents."""
        removed: set[str] = set()
        for _ in range(5):  # children first: an image with dependent children is refused, so go round again
            left = self.images_with_label(key, value, all_images=True)
            if not left:
                break
            for info in left:
                try:
                    self.api.remove_image(info.id, force=True)
                    removed.add(info.id)
                except docker.errors.ImageNotFound:
                    removed.add(info.id)
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:
                        raise EngineError(f"cannot remove image {info.id[:19]}: {exc.explanation}") from None
        return len(removed)

    # ---------------------------------------------------------------------------------------- build
    def build(
        self,
        files: dict[str, bytes],
        *,
        tag: str,
        labels: dict[str, str],
        on_line: Callable[[str], None],
        stop: threading.Event,
        nocache: bool = False,
        build_args: dict[str, str] | None = None,
    ) -> str:
        """Build a context given as files; stream every log line to on_line; return the image id.

        `labels` go on as one LABEL instruction at the Dockerfile's end: given to the SDK, Engine 20.10 adds
        one step per label (about 0.1 s each). `build_args` are for Docker's predefined proxy arguments only
        (http_proxy, no_proxy): the classic builder keeps those out of the image, its history and the cache key.

        Raises BuildFailed on an {"error": ...} event, Interrupted if `stop` is set meanwhile.
        """
        buf = io.BytesIO(_tar({**files, "Dockerfile": with_labels(files["Dockerfile"], labels)}))
        image_id = None
        stream = self.api.build(
            fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True, pull=False,
            network_mode="host", decode=True, nocache=nocache, timeout=BUILD_SILENCE_S, buildargs=build_args or None,
        )
        try:
            for event in stream:
                if stop.is_set():
                    raise Interrupted(f"build of {tag} interrupted")
                if "stream" in event:
                    for line in str(event["stream"]).splitlines():
                        on_line(line)
                if "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
                    image_id = event["aux"]["ID"]
                if "error" in event:
                    on_line(f"ERROR: {event['error']}")
                    raise BuildFailed(str(event["error"]).strip())
        except (requests.exceptions.RequestException, docker.errors.APIError, urllib3.exceptions.HTTPError) as exc:
            # urllib3's own: the SDK reads a build's stream from the raw response, which requests does not wrap
            if stop.is_set():
                raise Interrupted(f"build of {tag} interrupted") from None
            if not self.answers():
                raise EngineGone(gone(self.address, f"the build of {tag}")) from None
            raise BuildFailed(f"the engine broke off the build: {exc}") from None
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        if image_id is None:
            built = self.image(tag)
            if built is None:
                raise BuildFailed("the engine reported no image id")
            image_id = built.id
        return str(image_id)

    # ------------------------------------------------------------------------------------------ run
    @_translated
    def info(self) -> dict[str, Any]:
        return dict(self.api.info())

    def gpu_probe(self, image_id: str, request: GpuRequest) -> DriverProbe | None:
        """Ask the engine's own host for its driver and GPUs: nvidia-smi in a container given `request`.

        None when the engine cannot serve a GPU request at all (no runtime, hook or CDI). The NVIDIA
        hook puts nvidia-smi into the container, so this sees the engine's host even when the engine
        is remote; a hook without a driver or GPU gives a probe with an error.
        """
        command = ["sh", "-c", " ".join(QUERY)]
        try:
            done = self.run(image_id, command, labels={}, timeout=60, mem_limit="256m", gpus=request,
                            env={"NVIDIA_DRIVER_CAPABILITIES": "utility"})
        except EngineError as exc:
            if NO_DEVICE_DRIVER in str(exc):
                return None
            raise
        out = done.logs
        return parse_nvidia_smi(done.exit_code if done.exit_code is not None else -1, out, "",
                                f"nvidia-smi in a container on {self.address}")

    @_translated
    def run(
        self,
        image_id: str,
        command: list[str],
        *,
        labels: dict[str, str],
        timeout: float,
        mem_limit: str,
        gpus: GpuRequest | None = None,
        env: dict[str, str] | None = None,
        inject: dict[str, bytes] | None = None,
        fetch: str | None = None,
        stop: threading.Event | None = None,
    ) -> RunResult:
        """Run `command` in a fresh container of `image_id`; return its logs and the file `fetch`.

        `inject` (path -> bytes) is copied into the container before it starts. Without `gpus`,
        NVIDIA_VISIBLE_DEVICES=void: images set `all`, and a host whose default runtime is nvidia
        would otherwise hand them every GPU. The container is removed whatever happens.
        """
        host_config = self.api.create_host_config(
            mem_limit=mem_limit, device_requests=gpus.device_requests() if gpus else None, network_mode="none",
            shm_size="1g",
        )
        environment = {**({} if gpus else {"NVIDIA_VISIBLE_DEVICES": "void"}), **(env or {})}
        try:
            container = self.api.create_container(
                image_id, command=command, labels={**self._owned(), **labels}, host_config=host_config,
                environment=environment,
            )
        except docker.errors.APIError as exc:
            raise EngineError(f"cannot create a container of {image_id[:19]}: {exc.explanation}") from None
        cid = container["Id"]
        started = time.monotonic()
        exit_code: int | None = None
        try:
            if inject:
                self.api.put_archive(cid, "/", _tar(inject))
            try:
                self.api.start(cid)
            except docker.errors.APIError as exc:
                raise EngineError(f"cannot start a container of {image_id[:19]}: {exc.explanation}") from None
            deadline = started + timeout
            while True:
                if stop is not None and stop.is_set():
                    raise Interrupted("certification interrupted")
                try:
                    result = self.api.wait(cid, timeout=int(max(1, min(5, deadline - time.monotonic()))))
                    exit_code = int(result.get("StatusCode", -1))
                    break
                except requests.exceptions.RequestException as exc:
                    if not self.answers():  # not a wait that timed out: the engine is gone, and the run with it
                        raise EngineGone(gone(self.address, f"a run of {image_id[:19]}")) from None
                    if not isinstance(exc, (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)):
                        raise
                    if time.monotonic() >= deadline:
                        self.api.kill(cid)
                        break
            logs = self.api.logs(cid, stdout=True, stderr=True).decode("utf-8", "replace")
            files: dict[str, bytes] = {}
            try:
                if fetch is None:
                    raise docker.errors.NotFound("nothing to fetch")
                chunks, _ = self.api.get_archive(cid, fetch)
                with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
                    for member in tar.getmembers():
                        fh = tar.extractfile(member)
                        if fh is not None:
                            files[member.name] = fh.read()
            except docker.errors.NotFound:
                pass
            return RunResult(exit_code=exit_code, logs=logs, files=files, seconds=time.monotonic() - started)
        finally:
            try:
                self.api.remove_container(cid, force=True)
            except requests.exceptions.ConnectionError:  # the engine is gone: the next run's sweep removes it
                log.debug("could not remove container %s: the engine does not answer", cid[:12])

    def read_file(self, image_id: str, path: str) -> bytes | None:
        """A file from an image, without running it (symlinks followed); None where there is none."""
        with self.files(image_id) as read:
            return read(path)

    @contextmanager
    def files(self, image_id: str) -> Iterator[Callable[[str], bytes | None]]:
        """Read many files out of an image through one created (never started) container.

        Symlinks are followed inside the image, up to 8 hops; a path that is missing, a directory or a
        dangling link reads as None.
        """
        try:
            cid = self.api.create_container(image_id, command=["true"], labels=self._owned())["Id"]
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise EngineError(f"the engine at {self.address} failed (read files of {image_id[:19]}): "
                              f"{getattr(exc, 'explanation', None) or exc}") from None

        def read(path: str) -> bytes | None:
            for _ in range(8):
                try:
                    chunks, _ = self.api.get_archive(cid, path)
                except docker.errors.NotFound:
                    return None
                except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                    raise EngineError(f"the engine at {self.address} failed (read {path} of {image_id[:19]}): "
                                      f"{getattr(exc, 'explanation', None) or exc}") from None
                with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
                    member = tar.next()
                    if member is None:
                        return None
                    if member.issym():
                        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
                        continue
                    fh = tar.extractfile(member) if member.isfile() else None
                    return fh.read() if fh else None
            return None

        try:
            yield read
        finally:
            try:
                self.api.remove_container(cid, force=True)
            except (docker.errors.APIError, requests.exceptions.RequestException):
                log.warning("could not remove the container %s used to read files", cid[:12])

    # -------------------------------------------------------------------------------------- cleanup
    def remove_container_ids(self, ids: Iterable[str]) -> int:
        """Force-remove exactly these containers (a build's own step containers); gone ones are skipped."""
        removed = 0
        for cid in list(ids):
            try:
                self.api.remove_container(cid, force=True)
                removed += 1
            except (docker.errors.NotFound, docker.errors.APIError, requests.exceptions.RequestException):
                pass
        return removed

    def remove_image_ids(self, ids: Iterable[str]) -> int:
        """Remove these images where nothing builds on them; the engine refuses the others (409), which stay.

        Given a build's own intermediate images, this drops its builder stage and keeps every ancestor of
        a tagged image, without touching what another build on the same engine is making.
        """
        removed = 0
        for image_id in list(ids):
            try:
                if self.api.inspect_image(image_id).get("RepoTags"):  # type: ignore[no-untyped-call]
                    continue  # a tagged image (the build's result) is never housekeeping
                self.api.remove_image(image_id)
                removed += 1
            except (docker.errors.NotFound, docker.errors.APIError, requests.exceptions.RequestException):
                pass
        return removed

    @_translated
    def remove_containers(self, label: str = MANAGED, running: bool = True) -> int:
        """Force-remove the containers carrying `label`.

        The classic builder's intermediate containers carry the Dockerfile's own managed label, so
        this also clears what an interrupted build left. running=False spares running containers:
        they belong to builds or runs still under way, perhaps another process's; and it spares every
        container of a run whose lease is alive (a live run's claim is a container that never runs).
        """
        removed = 0
        listed = self.api.containers(all=True, filters={"label": label})
        alive = set() if running else self._live_owners()
        for c in listed:
            if not running and (c.get("State") == "running" or (c.get("Labels") or {}).get(OWNER) in alive):
                continue
            try:
                self.api.remove_container(c["Id"], force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: its removal is already in progress (another clean-up)
                    raise
        return removed

    # ------------------------------------------------------------------------------------- registry
    # Pushing and pulling images. What a registry holds is read by builder.registry over HTTP; the engine
    # moves the image bytes, with credentials the SDK reads from the Docker config (never passed here).
    def push(self, ref: str, on_line: Callable[[str], None] | None = None) -> str:
        """Push `ref` (registry/repo:tag); return the manifest digest the registry answered with.

        The engine reports push failures inside the stream and the SDK does not raise them: every
        {"error": ...} event becomes a RegistryError (classified: retryable or not), as do API errors.
        """
        from builder.registry import classify

        registry = ref.split("/", 1)[0]
        repo, _, tag = ref.rpartition(":")
        digest = None
        try:
            for event in self.api.push(repo, tag=tag, stream=True, decode=True):
                if "error" in event or "errorDetail" in event:
                    detail = event.get("error") or (event.get("errorDetail") or {}).get("message") or str(event)
                    raise classify(str(detail), registry, f"the push of {ref}")
                aux = event.get("aux")
                if isinstance(aux, dict) and aux.get("Digest"):
                    digest = str(aux["Digest"])
                if on_line is not None and event.get("status"):
                    on_line(" ".join(str(event.get(k, "")) for k in ("id", "status")).strip())
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            detail = getattr(exc, "explanation", None) or str(exc)
            raise classify(str(detail), registry, f"the push of {ref}") from None
        if digest is None:
            raise classify("the engine reported no digest", registry, f"the push of {ref}")
        return digest

    def pull_digest(self, ref: str) -> ImageInfo:
        """Pull `registry/repo@sha256:...` and return the image; failures become one-line RegistryErrors."""
        from builder.registry import classify

        registry = ref.split("/", 1)[0]
        name, _, digest = ref.partition("@")
        try:
            for event in self.api.pull(name, tag=digest, stream=True, decode=True):
                if "error" in event or "errorDetail" in event:
                    detail = event.get("error") or (event.get("errorDetail") or {}).get("message") or str(event)
                    raise classify(str(detail), registry, f"the pull of {ref}")
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            detail = getattr(exc, "explanation", None) or str(exc)
            raise classify(str(detail), registry, f"the pull of {ref}") from None
        info = self.image(ref)
        if info is None:
            raise EngineError(f"the engine at {self.address} pulled {ref} but cannot find it")
        return info

    @_translated
    def untag(self, ref: str) -> None:
        """Remove the name `ref` only; the image stays while another name or a child holds it."""
        try:
            self.api.remove_image(ref, noprune=True)
        except docker.errors.ImageNotFound:
            return  # already gone: nothing to undo

    # ------------------------------------------------------------------------- claims, leases, sweep
    def answers(self) -> bool:
        """Whether the engine answers a ping within a few seconds (after a stream broke off: crashed, or not)."""
        try:
            self.api.get(f"{self.api.base_url}/_ping", timeout=5).raise_for_status()
            return True
        except (requests.exceptions.RequestException, docker.errors.DockerException):
            return False

    def _live_owners(self) -> set[str]:
        """The owners of the runs whose lease on this engine is alive (this process's included, if it has one)."""
        return live_owners(self.api.containers(all=True, filters={"label": OWNER}), time.time())

    def _owned(self) -> dict[str, str]:
        """The labels of a container this process makes: its owner, where it holds a lease, for the sweep."""
        owner = self._owner
        return {MANAGED: "true", **({OWNER: owner} if owner else {})}

    def _lease(self, image_id: str) -> str:
        """This process's owner id on this engine, with its lease running (a new one if the engine lost it)."""
        with self._lease_lock:
            if self._owner is not None and self._lease_id is not None:
                try:
                    if self.api.inspect_container(self._lease_id)["State"].get("Running"):
                        return self._owner
                except docker.errors.NotFound:
                    pass
                log.warning("the lease of this run on %s ended (the engine restarted?): taking a new one", self.address)
            owner = uuid.uuid4().hex
            labels = {MANAGED: "true", OWNER: owner, OWNER_HOST: platform.node(), OWNER_PID: str(os.getpid())}
            host_config = self.api.create_host_config(network_mode="none", mem_limit="16m")
            cid = self.api.create_container(image_id, entrypoint=["cat"], command=[], stdin_open=True, labels=labels,
                                            name=f"{LEASE_PREFIX}{owner}", host_config=host_config)["Id"]
            try:
                sock = self.api.attach_socket(cid, params={"stdin": 1, "stream": 1})
            except (AttributeError, NotImplementedError, OSError, docker.errors.DockerException) as exc:
                # Without a lease nobody could tell this run alive: it claims nothing and labels nothing (so no
                # other run takes its work for a dead run's), and is not protected from a concurrent one.
                self.api.remove_container(cid, force=True)
                log.warning("no lease on %s (%s): runs on this engine are not kept from building the same cell "
                            "at once", self.address, exc)
                self._leaseless = True
                return ""
            try:
                self.api.start(cid)
            except BaseException:
                self.api.remove_container(cid, force=True)
                raise
            self._owner, self._lease_id, self._lease_socket = owner, cid, sock
            return owner

    @_translated
    def claim(self, kind: str, key: str, tag: str, image_id: str) -> Claim | Holder:
        """Claim `kind` work on content `key` (a hash), engine-wide; or say which live run holds it.

        A claim left by a run that died is cleared (with what its build made) and taken over.
        """
        name = claim_name(kind, key)
        owner = "" if self._leaseless else self._lease(image_id)
        if not owner:
            return Claim(name=name, id="", owner="", tag=tag)
        labels = {MANAGED: "true", OWNER: owner, CLAIM: kind, TAG: tag,
                  OWNER_HOST: platform.node(), OWNER_PID: str(os.getpid())}
        for _ in range(5):
            try:
                cid = self.api.create_container(image_id, entrypoint=["true"], command=[], labels=labels, name=name,
                                                host_config=self.api.create_host_config(network_mode="none"))["Id"]
                return Claim(name=name, id=cid, owner=owner, tag=tag)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
            found = self.api.containers(all=True, filters={"name": f"^/{name}$"})
            if not found:  # released between the two calls, or its creation has the name but is not listed yet
                time.sleep(0.2)
                continue
            holder = found[0]
            holder_owner = (holder.get("Labels") or {}).get(OWNER, "")
            leases = self.api.containers(all=True, filters={"label": f"{OWNER}={holder_owner}"}) if holder_owner else []
            if holder_owner and holder_owner in live_owners(leases, time.time()):
                return Holder(name=name, id=holder["Id"], who=owner_of(holder.get("Labels") or {}))
            log.info("%s: clearing the claim of a run that stopped (%s)", tag, owner_of(holder.get("Labels") or {}))
            self._clear(leases or [holder])  # everything of that dead run: its lease, claims, containers
        return Holder(name=name, id="", who="another run, still creating its claim")  # the caller waits, asks again

    def note_made(self, claim: Claim, containers: Iterable[str], images: Iterable[str]) -> None:
        """Keep in the claim what its build has made so far, for the sweep should this run die."""
        if not claim.id:
            return
        body = json.dumps({"containers": sorted(containers), "images": sorted(images)}).encode()
        try:
            self.api.put_archive(claim.id, "/", _tar({MADE_FILE: body}))
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.debug("could not note what %s made: %s", claim.tag, exc)

    def _made(self, claim_id: str) -> tuple[set[str], set[str]]:
        try:
            chunks, _ = self.api.get_archive(claim_id, f"/{MADE_FILE}")
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
                member = tar.next()
                fh = tar.extractfile(member) if member is not None else None
                data = json.loads(fh.read()) if fh else {}
        except (docker.errors.APIError, requests.exceptions.RequestException, tarfile.TarError, ValueError):
            return set(), set()
        if not isinstance(data, dict):
            return set(), set()
        return ({str(c) for c in data.get("containers") or [] if _ID.fullmatch(str(c))},
                {str(i) for i in data.get("images") or [] if _ID.fullmatch(str(i).removeprefix("sha256:"))})

    def _clear(self, dead: list[dict[str, Any]]) -> tuple[int, int]:
        """Remove dead runs' containers and what their claims say their builds made; (containers, images)."""
        containers: set[str] = set()
        images: set[str] = set()
        for c in dead:
            if CLAIM in (c.get("Labels") or {}):
                made = self._made(c["Id"])
                containers |= made[0]
                images |= made[1]
        removed = self.remove_container_ids([*containers, *(c["Id"] for c in dead)])
        gone_images = 0
        for _ in range(3):  # a child goes before its parent: the engine refuses a parent while a child is there
            done = self.remove_image_ids(sorted(images))
            gone_images += done
            if not done:
                break
        return removed, gone_images

    def release(self, claim: Claim) -> None:
        """Give the claim back (by id: a claim another run took over after ours was cleared is not ours)."""
        if not claim.id:
            return
        try:
            self.api.remove_container(claim.id, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.debug("could not release %s (the next run's sweep will): %s", claim.name, exc)

    @_translated
    def sweep(self) -> Swept:
        """Remove what runs that died left on this engine: their claims, leases, containers and recorded images."""
        listed = self.api.containers(all=True, filters={"label": OWNER})
        dead = stale(listed, time.time(), keep=self._owner)
        if not dead:
            return Swept()
        owners = tuple(sorted({owner_of(c.get("Labels") or {}) for c in dead
                               if str((c.get("Names") or [""])[0]).lstrip("/").startswith(LEASE_PREFIX)}))
        containers, images = self._clear(dead)
        return Swept(containers=containers, images=images, owners=owners)

    def end_lease(self) -> None:
        """End this process's lease (at the end of a run): nothing of it stays on the engine."""
        with self._lease_lock:
            lease, sock = self._lease_id, self._lease_socket
            self._owner = self._lease_id = self._lease_socket = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if lease is not None:
            try:
                self.api.remove_container(lease, force=True)
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                log.debug("could not remove this run's lease (the next run's sweep will): %s", exc)
