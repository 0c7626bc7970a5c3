"""Talk to an OCI distribution registry over its HTTP API: manifests, image labels, the certificate artifact.

The engine pushes and pulls images; this module reads what a registry holds (so `resolve` asks the
registry itself, with no engine) and pushes the certificate beside the image. Credentials come only
from the Docker config, through the Docker SDK's own reader (`docker login`, credential helpers);
nothing is taken from the command line and nothing is written. Every failure becomes one
RegistryError line, marked retryable for connection resets and 5xx answers (see `classify`).

HTTPS or plain HTTP is decided as the engine decides it (`engine_insecure`): a registry the engine
treats as insecure (its insecure-registries, loopback by default) is tried over HTTPS without
verification, then plain HTTP, as Docker does; every other registry is HTTPS, verified, and never
downgraded.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from urllib3.exceptions import InsecureRequestWarning

from builder.errors import RegistryError

log = logging.getLogger("builder")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST)
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
CERT_ARTIFACT = "application/vnd.builder.certificate.v1+json"
TIMEOUT = (10, 300)  # connect, read

T = TypeVar("T")

# What a message from the engine's push stream or from a registry says, and whether to try again.
# Order matters: the first pattern that matches decides.
_KINDS: tuple[tuple[str, bool, str], ...] = (
    (r"connection refused|no such host|name or service not known|no route to host|network is unreachable|"
     r"cannot assign requested",
     False, "nothing answers at {registry} ({detail}): start the registry, or fix the host:port in --registry"),
    (r"\bssl|\btls\b|x509|certificate verify failed|wrong version number|server gave http response to https client",
     False, "{registry} failed the TLS handshake ({detail}): the engine treats it as a secure registry, so "
     "builder speaks verified HTTPS to it too; a plain-HTTP or self-signed registry must be in the engine's "
     "insecure-registries (daemon.json)"),
    (r"no basic auth credentials|authentication required|unauthorized|status 401|\b401\b",
     False, "{registry} requires a login: run `docker login {registry}` (builder reads credentials only from "
     "the Docker config)"),
    (r"denied|forbidden|status 403|\b403\b",
     False, "{registry} denied {what} ({detail}): the account logged in for it lacks access to that repository"),
    (r"read-only|read only|unsupported|method not allowed|status 405|\b405\b",
     False, "{registry} refuses writes ({detail}): it is in read-only mode, or does not accept pushes"),
    (r"connection reset|broken pipe|\beof\b|unexpected eof|i/o timeout|timed out|timeout|temporarily unavailable|"
     r"\b50[0-9]\b|internal server error|bad gateway|service unavailable|gateway time-?out|connection aborted|"
     r"remote end closed",
     True, "{registry} failed during {what} ({detail})"),
)


def classify(message: str, registry: str, what: str = "the request") -> RegistryError:
    """One clear line for a registry failure, marked retryable for resets, timeouts and 5xx answers."""
    full = " ".join(message.split())
    known = re.search(r"connection refused|name or service not known|no route to host|connection reset by peer|"
                      r"remote end closed connection without response|read timed out|connect timeout|"
                      r"method not allowed|requested access to the resource is denied|authentication required|"
                      r"wrong version number|certificate verify failed|server gave http response to https client|"
                      r"x509: [a-z ]+",
                      full, re.I)
    detail = known[0].lower() if known else full[:200]  # urllib3's wrapping adds nothing a person needs
    low = full.lower()
    for pattern, retryable, template in _KINDS:
        if re.search(pattern, low):
            return RegistryError(template.format(registry=registry, what=what, detail=detail), retryable)
    return RegistryError(f"{registry} failed during {what}: {detail}")


def with_retries(call: Callable[[], T], *, attempts: int = 4, first_wait: float = 1.0,
                 sleep: Callable[[float], None] | None = None) -> T:
    """Call, retrying a retryable RegistryError with exponential backoff (1, 2, 4 s ...); others at once."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except RegistryError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            wait = first_wait * 2 ** (attempt - 1)
            log.warning("%s; retrying in %.0f s (attempt %d of %d)", exc, wait, attempt + 1, attempts)
            (sleep or time.sleep)(wait)
    raise AssertionError("unreachable")


def split_reference(ref: str) -> tuple[str, str, str]:
    """`host[:port]/path/name[:tag|@digest]` -> (host, path/name, tag or digest). The host must be given."""
    name, reference = ref, "latest"
    if "@" in ref:
        name, reference = ref.split("@", 1)
    elif ":" in ref.rsplit("/", 1)[-1]:
        name, reference = ref.rsplit(":", 1)
    host, _, path = name.partition("/")
    return host, path, reference


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def engine_insecure(host: str, registry_config: Mapping[str, Any] | None,
                    resolve: Callable[[str], list[str]] | None = None) -> bool:
    """Whether the engine whose `docker info` RegistryConfig this is treats registry `host` as insecure.

    Docker's own rule (registry/config.go, isSecureIndex): a host named in IndexConfigs is what its
    `Secure` says; any other is insecure when one of its addresses lies in InsecureRegistryCIDRs (which
    holds 127.0.0.0/8 unless the engine was told otherwise). Names are resolved here, not on the
    engine's host. With no engine to ask, only loopback is insecure.
    """
    if registry_config is None:
        return is_loopback(host)
    index = (registry_config.get("IndexConfigs") or {}).get(host)
    if isinstance(index, Mapping):
        return not index.get("Secure", True)
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    try:
        addresses = [ipaddress.ip_address(name)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in (resolve or _addresses)(name)]
        except (OSError, ValueError):
            addresses = []  # unresolvable here: no CIDR can match, as in Docker
    networks = []
    for cidr in registry_config.get("InsecureRegistryCIDRs") or []:
        try:
            networks.append(ipaddress.ip_network(str(cidr), strict=False))
        except ValueError:
            continue
    return any(a in n for a in addresses for n in networks if a.version == n.version)


def _addresses(name: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None)})


def docker_credentials(host: str) -> tuple[str, str] | None:
    """(user, secret) for `host` from the Docker config and its credential helpers, or None."""
    import docker.auth

    try:
        config = docker.auth.load_config()
        found = docker.auth.resolve_authconfig(config, host)
    except Exception as exc:  # a broken credential helper must say so, not crash
        raise RegistryError(f"cannot read the Docker credentials for {host}: {exc}") from None
    if not found:
        return None
    user = found.get("username") or found.get("Username")
    secret = found.get("password") or found.get("Password") or found.get("IdentityToken")
    return (str(user), str(secret)) if user and secret else None


def cert_tag(image_digest: str) -> str:
    """The tag cosign uses on registries without the referrers API: `sha256-<hex>.cert`."""
    algo, _, hexpart = image_digest.partition(":")
    return f"{algo}-{hexpart}.cert"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes

    @property
    def data(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Registry:
    """One registry host, over verified HTTPS unless `insecure` (default: loopback only; see engine_insecure).

    An insecure registry is spoken to as Docker speaks to it: HTTPS without certificate verification
    when it answers that way, else plain HTTP (chosen once, on the first request).
    """

    def __init__(self, host: str, session: requests.Session | None = None, *, insecure: bool | None = None) -> None:
        self.host = host
        self.insecure = is_loopback(host) if insecure is None else insecure
        self.session = session or requests.Session()
        self._base = None if self.insecure else f"https://{host}/v2"
        self._verify = not self.insecure
        self._token: dict[str, str] = {}  # scope -> bearer token
        self._basic: tuple[str, str] | None = None

    @property
    def base(self) -> str:
        """`scheme://host/v2`: for an insecure registry, HTTPS if it answers over TLS at all, else HTTP."""
        if self._base is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                    self.session.get(f"https://{self.host}/v2/", timeout=TIMEOUT, verify=False)
                self._base = f"https://{self.host}/v2"
            except requests.exceptions.RequestException:  # no TLS there (or nothing): Docker then tries HTTP
                self._base = f"http://{self.host}/v2"
                log.debug("%s: insecure registry without TLS: plain HTTP", self.host)
        return self._base

    # ----------------------------------------------------------------------------------- transport
    def _request(self, method: str, path: str, *, what: str, scope: str = "", ok: tuple[int, ...] = (200,),
                 **kwargs: Any) -> requests.Response:
        url = path if path.startswith("http") else self.base + path
        headers = dict(kwargs.pop("headers", {}))
        for attempt in range(2):
            if scope in self._token:
                headers["Authorization"] = f"Bearer {self._token[scope]}"
            elif self._basic:
                headers["Authorization"] = "Basic " + base64.b64encode(":".join(self._basic).encode()).decode()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                    resp = self.session.request(method, url, headers=headers, timeout=TIMEOUT, allow_redirects=True,
                                                verify=self._verify, **kwargs)
            except requests.exceptions.RequestException as exc:
                raise classify(str(exc), self.host, what) from None
            if resp.status_code == 401 and attempt == 0:
                self._authenticate(resp, scope)
                continue
            break
        if resp.status_code in ok:
            return resp
        raise classify(f"status {resp.status_code} {resp.reason}: {_error_text(resp)}", self.host, what)

    def _authenticate(self, resp: requests.Response, scope: str) -> None:
        creds = docker_credentials(self.host)
        challenge = resp.headers.get("WWW-Authenticate", "")
        if creds is None:
            raise classify("status 401 authentication required", self.host)
        if challenge.lower().startswith("bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            query = {"service": params.get("service", "")}
            if scope or params.get("scope"):
                query["scope"] = scope or params["scope"]
            try:
                got = self.session.get(params["realm"], params=query, auth=creds, timeout=TIMEOUT)
            except (requests.exceptions.RequestException, KeyError) as exc:
                raise classify(f"token request failed: {exc}", self.host, "login") from None
            if got.status_code != 200:
                raise classify(f"status {got.status_code} from the token service", self.host, "login")
            body = got.json()
            self._token[scope] = str(body.get("token") or body.get("access_token") or "")
        else:
            self._basic = creds

    # ------------------------------------------------------------------------------------- reading
    def ping(self) -> None:
        """Raise one clear RegistryError unless the registry answers its /v2/ endpoint (logging in if asked)."""
        with_retries(lambda: self._request("GET", "/", what="the API check"), attempts=2)

    def manifest(self, repo: str, reference: str) -> Manifest | None:
        """The manifest `repo:reference` (a tag or a digest), or None where the registry has none."""
        resp = with_retries(lambda: self._request(
            "GET", f"/{repo}/manifests/{reference}", what=f"reading {repo}:{reference}", scope=_pull(repo),
            ok=(200, 404), headers={"Accept": ", ".join(MANIFESTS)}))
        if resp.status_code == 404:
            return None
        body = resp.content
        digest = resp.headers.get("Docker-Content-Digest") or sha256(body)
        if digest != sha256(body):
            raise RegistryError(f"{self.host}: the manifest of {repo}:{reference} does not match its digest {digest}")
        media = resp.headers.get("Content-Type", "").split(";")[0] or json.loads(body).get("mediaType", "")
        return Manifest(digest=digest, media_type=media, body=body)

    def blob(self, repo: str, digest: str) -> bytes:
        resp = with_retries(lambda: self._request("GET", f"/{repo}/blobs/{digest}", what=f"reading a blob of {repo}",
                                                  scope=_pull(repo)))
        if sha256(resp.content) != digest:
            raise RegistryError(f"{self.host}: blob {digest[:19]} of {repo} does not match its digest")
        return resp.content

    def image_config(self, repo: str, manifest: Manifest) -> dict[str, Any]:
        """The image configuration (labels, env, ...) that a single-platform manifest points to."""
        data = manifest.data
        if manifest.media_type in (OCI_INDEX, DOCKER_LIST) or "config" not in data:
            raise RegistryError(f"{self.host}/{repo}@{manifest.digest}: a multi-platform index, not one image")
        return dict(json.loads(self.blob(repo, data["config"]["digest"])))

    def certificate(self, repo: str, image_digest: str) -> tuple[dict[str, Any], str] | None:
        """The certificate pushed for `image_digest` (from its `sha256-<hex>.cert` tag), and that artifact's digest."""
        found = self.manifest(repo, cert_tag(image_digest))
        if found is None:
            return None
        data = found.data
        layers = [d for d in data.get("layers", []) if d.get("mediaType") == CERT_ARTIFACT]
        subject = (data.get("subject") or {}).get("digest")
        if not layers or subject not in (None, image_digest):
            raise RegistryError(f"{self.host}/{repo}:{cert_tag(image_digest)} is not a builder certificate "
                                "for that image")
        return dict(json.loads(self.blob(repo, layers[0]["digest"]))), found.digest

    # ------------------------------------------------------------------------------------- writing
    def put_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        scope = _push(repo)
        head = self._request("HEAD", f"/{repo}/blobs/{digest}", what=f"checking a blob of {repo}", scope=scope,
                             ok=(200, 404))
        if head.status_code == 200:
            return digest
        start = self._request("POST", f"/{repo}/blobs/uploads/", what=f"pushing to {repo}", scope=scope, ok=(202,))
        location = start.headers["Location"]
        if not location.startswith("http"):
            location = self.base.removesuffix("/v2") + location
        sep = "&" if "?" in location else "?"
        self._request("PUT", f"{location}{sep}digest={digest}", what=f"pushing to {repo}", scope=scope, ok=(201,),
                      data=data, headers={"Content-Type": "application/octet-stream"})
        return digest

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        resp = self._request("PUT", f"/{repo}/manifests/{reference}", what=f"pushing {repo}:{reference}",
                             scope=_push(repo), ok=(201,), data=body, headers={"Content-Type": media_type})
        digest = resp.headers.get("Docker-Content-Digest") or sha256(body)
        if digest != sha256(body):
            raise RegistryError(f"{self.host} stored {repo}:{reference} under {digest}, not under its own digest")
        return digest

    def push_certificate(self, repo: str, image: Manifest, certificate: bytes, created: str) -> tuple[str, str]:
        """Push `certificate` as an OCI artifact whose subject is `image`; returns (tag, artifact digest).

        The manifest names the image as its `subject` (registries with the referrers API index it), and
        is tagged `sha256-<hex>.cert` (cosign's scheme) for registries without that API, such as
        distribution 2.8.
        """

        def push() -> tuple[str, str]:
            config = self.put_blob(repo, b"{}")
            layer = self.put_blob(repo, certificate)
            manifest = {
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": CERT_ARTIFACT,
                "config": {"mediaType": EMPTY_CONFIG, "digest": config, "size": 2},
                "layers": [{"mediaType": CERT_ARTIFACT, "digest": layer, "size": len(certificate),
                            "annotations": {"org.opencontainers.image.title": "certificate.json"}}],
                "subject": {"mediaType": image.media_type, "digest": image.digest, "size": len(image.body)},
                "annotations": {"org.opencontainers.image.created": created},
            }
            body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            tag = cert_tag(image.digest)
            return tag, self.put_manifest(repo, tag, body, OCI_MANIFEST)

        return with_retries(push)


def _pull(repo: str) -> str:
    return f"repository:{repo}:pull"


def _push(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def _error_text(resp: requests.Response) -> str:
    """The registry's own error codes and messages (`{"errors": [{"code", "message"}]}`), else the body."""
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except ValueError:
        text = resp.text
    return " ".join(text.split())[:200] or resp.reason
