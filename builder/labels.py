"""Every image label builder writes or reads, defined once.

engine, build and certify use the keys; render passes `image_labels(cell)` into the templates, which write
them as LABEL lines. Standard library only (uptodate.py reads HASH without importing the Docker SDK).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.matrix.model import Cell

PREFIX = "org.builder"
MANAGED = f"{PREFIX}.managed"  # on every stage and image a build makes: what `clean` may remove
SESSION = f"{PREFIX}.session"  # on containers: the run that made them
OWNER = f"{PREFIX}.owner"  # on containers: the process that made them (its lease shows it is alive)
OWNER_HOST = f"{PREFIX}.owner.host"  # where that process runs, and its pid: for people, not decisions
OWNER_PID = f"{PREFIX}.owner.pid"
CLAIM = f"{PREFIX}.claim"  # on a claim container: the kind of work (build, certify) it holds
HASH = f"{PREFIX}.hash"  # the cell's content hash (builder.render.content_hash)
TAG = f"{PREFIX}.tag"
VERSION = f"{PREFIX}.version"  # builder's own version
LEVEL = f"{PREFIX}.certificate.level"
CERT_DIGEST = f"{PREFIX}.certificate.digest"
FRAMEWORK = f"{PREFIX}.framework"
FRAMEWORK_VERSION = f"{PREFIX}.framework.version"
CUDA = f"{PREFIX}.cuda"
CUDNN = f"{PREFIX}.cudnn"
PYTHON = f"{PREFIX}.python"
FLAVOR = f"{PREFIX}.flavor"
DRIVER_MIN = f"{PREFIX}.driver.min"

OCI = "org.opencontainers.image"
OCI_TITLE = f"{OCI}.title"
OCI_VERSION = f"{OCI}.version"
OCI_BASE_NAME = f"{OCI}.base.name"
OCI_DESCRIPTION = f"{OCI}.description"
OCI_CREATED = f"{OCI}.created"
OCI_REVISION = f"{OCI}.revision"


def image_labels(cell: Cell) -> dict[str, str]:
    """What the Dockerfile labels a cell's image with (its claims, readable by `docker image inspect`)."""
    return {
        OCI_TITLE: cell.framework,
        OCI_VERSION: cell.version,
        OCI_BASE_NAME: cell.base.image,
        OCI_DESCRIPTION: f"{cell.framework} {cell.version}, {cell.cuda_label}, Python {cell.python}, {cell.flavor}",
        TAG: cell.tag,
        FRAMEWORK: cell.framework,
        FRAMEWORK_VERSION: cell.version,
        CUDA: cell.cuda or "none",
        CUDNN: cell.cudnn or "none",
        PYTHON: cell.python,
        FLAVOR: cell.flavor,
        DRIVER_MIN: cell.driver_floor or "none",
    }


def build_labels(*, content_hash: str, tag: str, created: str, revision: str, version: str) -> dict[str, str]:
    """What a build adds through the engine (not in the Dockerfile: they would change the content hash)."""
    return {MANAGED: "true", HASH: content_hash, TAG: tag, OCI_CREATED: created, OCI_REVISION: revision,
            VERSION: version}
