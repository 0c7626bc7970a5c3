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
