"""Base images: use the local one, else pull it, else bootstrap it offline with debootstrap.

Air-gapped sites cannot pull; a base the matrix says how to bootstrap is made from a distribution
mirror and imported under the same reference, so the rendered Dockerfiles need no change.
"""

from __future__ import annotations

import fnmatch
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


# What Debian's official images (made by debuerreotype) set up for builds, so that a bootstrapped base behaves
# like the `debian:*-slim` it stands in for: dpkg without a sync per file, apt's caches cleaned after each run,
# indexes kept compressed and without translations, no service started by a package, and the slim variant's
# path filters, which keep documentation (copyright notices aside), manuals and translations out of the base
# and out of every package installed on it later.
_CONFIG = {
    "etc/dpkg/dpkg.cfg.d/docker-apt-speedup": "force-unsafe-io\n",
    "etc/apt/apt.conf.d/docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'),
    "etc/apt/apt.conf.d/docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "etc/apt/apt.conf.d/docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
}
_POLICY_RC = "usr/sbin/policy-rc.d"
SLIM_EXCLUDE = ("/usr/share/doc/*", "/usr/share/groff/*", "/usr/share/info/*", "/usr/share/linda/*",
                "/usr/share/lintian/overrides/*", "/usr/share/locale/*", "/usr/share/man/*")
SLIM_INCLUDE = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")


def slim(root: str) -> None:
    """Give the bootstrapped tree at `root` the official slim images' build configuration and trim it to match.

    dpkg matches path-exclude/include with fnmatch, `*` crossing `/`, and so does this trim: what a later
    package would not be allowed to install is removed now, then the directories and links left empty.
    """
    for name, text in _CONFIG.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    policy = os.path.join(root, _POLICY_RC)
    os.makedirs(os.path.dirname(policy), exist_ok=True)
    with open(policy, "w") as fh:
        fh.write("#!/bin/sh\n# Packages start no services while an image is built.\nexit 101\n")
    os.chmod(policy, 0o755)
    with open(os.path.join(root, "etc/dpkg/dpkg.cfg.d/docker"), "w") as fh:
        fh.write("".join(f"path-exclude {p}\n" for p in SLIM_EXCLUDE)
                 + "".join(f"path-include {p}\n" for p in SLIM_INCLUDE))
    for top in sorted({os.path.dirname(p) for p in SLIM_EXCLUDE}):
        where = os.path.join(root, top.lstrip("/"))
        for current, _, files in os.walk(where):  # first every file that is not kept (links stay for now)
            for name in files:
                path = os.path.join(current, name)
                if not os.path.islink(path) and not _kept(root, path):
                    os.unlink(path)
        removed = True
        while removed:  # then links left dangling and folders left empty, until none is
            removed = False
            for current, dirs, files in os.walk(where, topdown=False):
                for name in files + dirs:
                    path = os.path.join(current, name)
                    if os.path.islink(path) and not _resolves(root, path):
                        os.unlink(path)
                        removed = True
                    elif not os.path.islink(path) and os.path.isdir(path) and not os.listdir(path):
                        os.rmdir(path)
                        removed = True


def _resolves(root: str, path: str) -> bool:
    """Whether the link at `path` leads to something inside `root`, an absolute target read as from inside it
    (as in a chroot: /etc/alternatives/... is the tree's, never this machine's)."""
    for _ in range(40):  # the kernel's own limit on a chain of links
        if not os.path.islink(path):
            return os.path.exists(path)
        target = os.readlink(path)
        path = os.path.join(root, target.lstrip("/")) if target.startswith("/") else \
            os.path.join(os.path.dirname(path), target)
    return False


def _kept(root: str, path: str) -> bool:
    inside = "/" + os.path.relpath(path, root)
    return any(fnmatch.fnmatchcase(inside, p) for p in SLIM_INCLUDE)


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
        for extra in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(os.path.join(root, extra), ignore_errors=True)
            os.makedirs(os.path.join(root, extra), exist_ok=True)
        slim(root)
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
