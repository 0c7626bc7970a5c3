"""Base images: use the local one, else pull it, else bootstrap it offline with debootstrap.

Air-gapped sites cannot pull; a base the matrix says how to bootstrap is made from a distribution
mirror and imported under the same reference, so the rendered Dockerfiles need no change.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time

from builder.engine import ContainerEngine
from builder.errors import BaseImageError, EngineError
from builder.matrix.model import Base

log = logging.getLogger("builder")


def _bootstrap(engine: ContainerEngine, base: Base) -> str:
    assert base.bootstrap is not None
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="builder-rootfs-") as root:
        log.info("base %s: debootstrap %s from %s ...", base.image, base.bootstrap.suite, base.bootstrap.mirror)
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", base.bootstrap.suite, root, base.bootstrap.mirror],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"debootstrap failed: {tail[0]}")
        # Cut what a container never needs, as the official slim images do.
        for extra in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(os.path.join(root, extra), ignore_errors=True)
            os.makedirs(os.path.join(root, extra), exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", root, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            image_id = engine.import_rootfs(tar.stdout, base.image)
        finally:
            tar.stdout.close()
            tar.wait()
    log.info("base %s: bootstrapped in %.0f s", base.image, time.monotonic() - started)
    return image_id


def ensure_base(engine: ContainerEngine, base: Base) -> tuple[str, str]:
    """(image id, how it was had: local, pulled or bootstrapped), by the first way that works."""
    found = engine.image(base.image)
    if found is not None:
        return found.id, "local"
    tried = [f"not in the engine at {engine.address}"]
    try:
        log.info("base %s: pulling ...", base.image)
        engine.pull(base.image)
        pulled = engine.image(base.image)
        if pulled is not None:
            return pulled.id, "pulled"
        tried.append("pull: finished without the image")
    except EngineError as exc:
        tried.append(f"pull failed: {str(exc).splitlines()[0][:160]}")
    if base.bootstrap is None:
        tried.append("no bootstrap configured for it in the matrix")
    else:
        try:
            return _bootstrap(engine, base), "bootstrapped"
        except (RuntimeError, OSError, EngineError) as exc:
            tried.append(f"bootstrap failed: {exc}")
    raise BaseImageError(
        f"base {base.name} ({base.image}): {'; '.join(tried)}. Load it with `docker load`, make a registry "
        "reachable, or give the base a `bootstrap` in the matrix"
    )
