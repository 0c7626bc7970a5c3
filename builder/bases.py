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
# The slim variant's lists as debuerreotype keeps them today (groff's data stays since 2020: groff needs it).
SLIM_EXCLUDE = ("/usr/share/doc/*", "/usr/share/info/*", "/usr/share/linda/*", "/usr/share/lintian/overrides/*",
                "/usr/share/locale/*", "/usr/share/man/*", "/usr/share/doc/kde/HTML/*/*", "/usr/share/gnome/help/*/*",
                "/usr/share/omf/*/*-*.emf")
SLIM_INCLUDE = ("/usr/share/doc/*/copyright", "/usr/share/doc/kde/HTML/C/*", "/usr/share/gnome/help/*/C/*",
                "/usr/share/locale/all_languages", "/usr/share/locale/currency/*", "/usr/share/locale/l10n/*",
                "/usr/share/locale/languages", "/usr/share/locale/locale.alias", "/usr/share/omf/*/*-C.emf")


def _write(root: str, name: str, text: str, mode: int = 0o644) -> None:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)  # whatever this process's umask: apt run as another user reads them


def slim(root: str) -> None:
    """Give the bootstrapped tree at `root` the official slim images' build configuration and trim it to match.

    dpkg matches path-exclude/include with fnmatch, `*` crossing `/`, and so does this trim: under each excluded
    folder, every file that a later package would not be allowed to install is removed, then the links left
    dangling and the folders left empty. Links are read as from inside the tree (a chroot), never this machine.
    The manual sections' folders are made again, empty: some packages' scripts (openjdk's) link pages into them.
    """
    for name, text in _CONFIG.items():
        _write(root, name, text)
    _write(root, _POLICY_RC, "#!/bin/sh\n# Packages start no services while an image is built.\nexit 101\n", 0o755)
    _write(root, "etc/dpkg/dpkg.cfg.d/docker", "".join(f"path-exclude {p}\n" for p in SLIM_EXCLUDE)
           + "".join(f"path-include {p}\n" for p in SLIM_INCLUDE))
    man = os.path.join(root, "usr/share/man")
    sections = sorted(n for n in (os.listdir(man) if _inside(root, man) == man and os.path.isdir(man) else [])
                      if fnmatch.fnmatchcase(n, "man[0-9]"))
    tops = sorted({os.path.dirname(p) for p in SLIM_EXCLUDE if p.endswith("/*") and "*" not in os.path.dirname(p)})
    for top in tops:
        where = os.path.join(root, top.lstrip("/"))
        if _inside(root, where) != where or not os.path.isdir(where):
            continue  # missing, or reached through a link: nothing of the tree's own to trim
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
                    if os.path.islink(path) and _inside(root, path) is None:
                        os.unlink(path)
                        removed = True
                    elif not os.path.islink(path) and os.path.isdir(path) and not os.listdir(path):
                        os.rmdir(path)
                        removed = True
    for section in sections:
        os.makedirs(os.path.join(man, section), exist_ok=True)


def _inside(root: str, path: str) -> str | None:
    """Where `path` (under `root`) leads with every link on the way read as from inside `root`, as in a chroot:
    an absolute target starts again at `root`, and `..` stops there. None where it leads to nothing."""
    todo = os.path.relpath(path, root).split(os.sep)
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)  # every folder above `here` is a real one inside the tree
        if os.path.islink(here):
            hops += 1
            if hops > 40:  # the kernel's own limit on a chain of links
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = target.split("/") + todo
        elif os.path.lexists(here):
            done.append(part)
        else:
            return None
    return os.path.join(root, *done)


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
