"""Image names and tags: the one module that composes them and checks them against the registry's rules.

The rules are the OCI distribution spec's and Docker's reference grammar (distribution/reference):
a repository is `[HOST[:PORT]/]COMPONENT(/COMPONENT)*` where each path component matches
`[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`, the whole name is at most 255 characters, and a tag matches
`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`. Every check returns a problem sentence (or None) instead of raising,
so the matrix loader can report it at `file:line` beside every other problem.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MAX_NAME = 255  # distribution/reference NameTotalLengthMax: the repository, registry host included
MAX_TAG = 128
# A path component of a repository name (OCI distribution spec, "pulling manifests").
COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*", re.ASCII)
# A registry host: DNS labels (upper case allowed, as Docker does), or an IPv6 literal, and an optional port.
HOST = re.compile(
    r"(?:(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?",
    re.ASCII,
)
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", re.ASCII)
# The longest file name most file systems allow is 255 bytes; names made from tags stay well under it.
MAX_FILE_NAME = 200


def _shown(text: str, limit: int = 60) -> str:
    """A value for a message: quoted, escaped, and cut short with its length when long."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _has_host(first: str, rest: list[str]) -> bool:
    # Docker's rule: the first component is a registry host when more follow and it has '.' or ':'
    # or is localhost (or has upper case, which no path component may).
    return bool(rest) and (any(c in first for c in ".:") or first == "localhost" or first != first.lower())


def repository_problem(name: str) -> str | None:
    """Why `name` is not a valid image repository (e.g. `registry.example.com:5000/ml/torch`), or None."""
    if not name:
        return "an image repository cannot be empty"
    if len(name) > MAX_NAME:
        return f"{_shown(name)} is too long for an image repository ({len(name)} characters; at most {MAX_NAME})"
    first, *rest = name.split("/")
    components = [first, *rest]
    if _has_host(first, rest):
        if HOST.fullmatch(first) is None:
            return f"{_shown(name)}: {_shown(first)} is not a registry host[:port]"
        components = rest
    for part in components:
        if COMPONENT.fullmatch(part) is None:
            return (f"{_shown(name)}: path component {_shown(part)} is not lower-case letters and digits "
                    "joined by '.', '_', '__' or '-'")
    return None


def tag_problem(tag: str) -> str | None:
    """Why `tag` is not a valid image tag, or None."""
    if len(tag) > MAX_TAG:
        return f"tag {_shown(tag)} is too long ({len(tag)} characters; at most {MAX_TAG})"
    if TAG.fullmatch(tag) is None:
        return f"tag {_shown(tag)} may hold only letters, digits, '_', '.' and '-', and not start with '.' or '-'"
    return None


@dataclass(frozen=True, kw_only=True)
class ImageName:
    """A repository and a tag, valid by construction (see `image_name`)."""

    repository: str
    tag: str

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}"


class InvalidName(ValueError):
    """A repository or tag that the registry would refuse; the message says why."""


def image_name(repository: str, tag: str) -> ImageName:
    """`repository:tag`, checked. Raises InvalidName with the reason."""
    problem = repository_problem(repository) or tag_problem(tag)
    if problem:
        raise InvalidName(problem)
    return ImageName(repository=repository, tag=tag)


def cell_repository(prefix: str, framework: str) -> str:
    """The repository of a framework's images under the matrix's `repository:` prefix."""
    return f"{prefix}/{framework}"


def cell_tag(
    *, version: str, cuda: str | None, cudnn: str | None, python: str, flavor: str, base: str
) -> str:
    """A cell's tag: `2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12` (cpu cells: `2.4.1-cpu-py3.11-...`).

    `cudnn` may be the exact version; the tag carries its major.minor.
    """
    parts = [version, f"cuda{cuda}" if cuda else "cpu"]
    if cudnn:
        parts.append("cudnn" + ".".join(cudnn.split(".")[:2]))
    parts += [f"py{python}", flavor, base]
    return "-".join(parts)


def file_name(reference: str) -> str:
    """`reference` (`repo/name:tag`) as one safe file or directory name, under MAX_FILE_NAME bytes.

    Characters outside [A-Za-z0-9._-] become `_`; a name that would be too long keeps its start and ends
    with a digest of the whole reference, so distinct references keep distinct names.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", reference)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if len(safe) <= MAX_FILE_NAME:
        return safe
    digest = hashlib.sha256(reference.encode()).hexdigest()[:16]
    return f"{safe[:MAX_FILE_NAME - 17]}-{digest}"


# ---------------------------------------------------------------------------------- registry (issue 8)
REGISTRY_ENV = "BUILDER_REGISTRY"


def registry_problem(value: str) -> str | None:
    """Why `value` is not `HOST[:PORT][/NAMESPACE...]` (e.g. `127.0.0.1:5000/team`), or None."""
    host, _, namespace = value.partition("/")
    if not host or HOST.fullmatch(host) is None or not (any(c in host for c in ".:") or host == "localhost"):
        return (f"registry {_shown(value)} must start with a registry host such as registry.example.com, "
                "localhost:5000 or 127.0.0.1:5000")
    for part in namespace.split("/") if namespace else ():
        if COMPONENT.fullmatch(part) is None:
            return (f"registry {_shown(value)}: namespace component {_shown(part)} is not lower-case letters and "
                    "digits joined by '.', '_', '__' or '-'")
    return None


def choose_registry(flag: str | None, matrix: str | None, env: str | None) -> tuple[str, str] | None:
    """(registry, where it came from): --registry, else the matrix's `registry:`, else $BUILDER_REGISTRY."""
    for value, source in ((flag, "--registry"), (matrix, "matrix.yaml registry:"), (env, f"${REGISTRY_ENV}")):
        if value:
            value = value.strip().rstrip("/")
            problem = registry_problem(value)
            if problem:
                raise InvalidName(f"{source}: {problem}")
            return value, source
    return None


def remote_repository(registry: str, repository: str) -> str:
    """Where a local repository (`builder/torch`) lives in a registry (`127.0.0.1:5000/team/builder/torch`)."""
    name = f"{registry}/{repository}"
    problem = repository_problem(name)
    if problem:
        raise InvalidName(problem)
    return name


def immutable_tag(content_hash: str, certificate_digest: str) -> str:
    """The tag that is never moved: the build's content hash and the certificate's digest.

    A rebuild (new content) or a re-certification (new certificate) gives a new tag, so the tag
    always names the same image bytes and the same proof.
    """
    cert = certificate_digest.split(":", 1)[-1]
    tag = f"src-{content_hash[:16]}-cert-{cert[:16]}"
    problem = tag_problem(tag)
    if problem or len(content_hash) < 16 or len(cert) < 16:
        raise InvalidName(problem or f"cannot make an immutable tag from {_shown(content_hash)} and "
                          f"{_shown(certificate_digest)}")
    return tag


ALIAS_FIELDS = ("cuda", "cudnn", "python", "flavor", "base", "version", "minor")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def alias_problem(template: str) -> str | None:
    """Why an alias template (`latest-cuda{cuda}-py{python}`) cannot give a valid tag, or None."""
    names = _PLACEHOLDER.findall(template)
    unknown = [n for n in names if n not in ALIAS_FIELDS]
    if unknown:
        return (f"alias {_shown(template)}: unknown placeholder {{{unknown[0]}}} (use "
                + ", ".join(f"{{{f}}}" for f in ALIAS_FIELDS) + ")")
    # The longest values each placeholder can take here are short; check with typical ones.
    sample = alias_tag(template, {"cuda": "cpu", "cudnn": "9.1", "python": "3.11", "flavor": "runtime",
                                  "base": "debian12", "version": "2.4.1", "minor": "2.4"})
    if "{" in sample or "}" in sample:
        return f"alias {_shown(template)}: unbalanced braces"
    return tag_problem(sample)


def alias_tag(template: str, fields: dict[str, str]) -> str:
    """Fill an alias template with one cell's fields."""
    return _PLACEHOLDER.sub(lambda m: fields.get(m[1], m[0]), template)
