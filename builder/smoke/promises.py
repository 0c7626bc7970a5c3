"""What every image promises, checked from inside it: who runs, what it holds, what it leaks.

Runs beside payload.py in the certify container, as the image's own user: standard library only, any
Python from 3.8 on, and it never imports builder. `check(report, claims)` appends one `promise.*`
check per promise to the payload's Report. Values name files and variables, never their contents: a
certificate must not carry the secret it found.
"""

import configparser
import importlib.metadata
import os
import re
import stat
import subprocess
import sys
import time

# Set-user-id and set-group-id programs a Debian or Ubuntu base ships for logins and mounts (shadow,
# util-linux, login): the only ones an image may carry. /bin and /usr/bin are both named for bases
# without a merged /usr.
SETID_ALLOWED = frozenset(
    prefix + name
    for prefix in ("/usr/bin/", "/bin/", "/usr/sbin/", "/sbin/")
    for name in ("chfn", "chsh", "gpasswd", "newgrp", "passwd", "su", "mount", "umount", "chage", "expiry",
                 "unix_chkpwd")
)
# Never walked: kernel views and devices, which are not part of the image.
NOT_IMAGE = ("/proc", "/sys", "/dev")
# Directories that must be empty, but for the entries apt or the payload itself keeps there.
MUST_BE_EMPTY = {
    "/tmp": {"builder-smoke"},  # the payload's own result directory
    "/var/tmp": set(),
    "/var/cache/apt/archives": {"lock", "partial"},
    "/var/lib/apt/lists": {"lock", "partial", "auxfiles"},
}
APT_BINARY_CACHES = ("/var/cache/apt/pkgcache.bin", "/var/cache/apt/srcpkgcache.bin")
CREDENTIAL_FILES = (".netrc", "_netrc", ".pypirc", ".git-credentials")
# Per-home pip configs, and the Docker client's config (registry logins: `auth`, `identitytoken`).
HOME_PIP_CONFIGS = (os.path.join(".pip", "pip.conf"), os.path.join(".config", "pip", "pip.conf"))
DOCKER_CONFIG = os.path.join(".docker", "config.json")
DOCKER_SECRET_KEYS = ("auth", "identitytoken", "registrytoken", "password")
# A variable whose name says it holds a secret ...
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASS(WORD|WD)?($|_)|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH",
                         re.IGNORECASE)
# ... or a build-time package source, which must stay in the builder stage ...
SOURCE_VARIABLES = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "PIP_CLIENT_CERT",
                    "PIP_TRUSTED_HOST", "PIP_CONFIG_FILE", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "NETRC")
# ... or a URL with a user or password in it, whatever the name.
USERINFO_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@]+@", re.IGNORECASE)
PIP_SECRET_KEYS = ("client-cert", "password", "token")
# A UTC zone has no offset in winter or summer, and calls itself UTC.
SAMPLE_DATES = (1704067200, 1719792000)  # 2024-01-01 and 2024-07-01, 00:00 UTC
UTC_NAMES = ("UTC", "UCT", "Universal", "Zulu")
IMPORT_TIMEOUT_S = 600


def check(report, claims):
    """Append every promise.* check to `report` (the payload's Report)."""
    report.guard("promise.non_root", lambda: non_root(report))
    report.guard("promise.setid", lambda: setid_files(report))
    report.guard("promise.clean", lambda: caches_empty(report))
    report.guard("promise.credentials", lambda: credential_files(report))
    report.guard("promise.environment", lambda: environment(report, os.environ))
    report.guard("promise.timezone", lambda: timezone(report, os.environ.get("TZ")))
    report.guard("promise.pip_check", lambda: pip_check(report))
    report.guard("promise.companions", lambda: companions(report, claims or {}))


# --------------------------------------------------------------------------------------------- user
def non_root(report, uid=None, gid=None, image_user=None):
    """Not root, and (where certify passes the image's configured USER) a numeric uid:gid that is this one.

    Kubernetes' runAsNonRoot accepts only a numeric USER: a name cannot be checked without running.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    image_user = os.environ.get("BUILDER_IMAGE_USER") if image_user is None else image_user
    problems = []
    if uid == 0 or gid == 0:
        problems.append("root")
    if image_user is not None:
        numeric = re.fullmatch(r"([0-9]+)(?::([0-9]+))?", image_user)
        if numeric is None:
            problems.append(f"the image's USER {image_user!r} is not a numeric uid[:gid]")
        elif int(numeric.group(1)) != uid or (numeric.group(2) is not None and int(numeric.group(2)) != gid):
            problems.append(f"the image's USER {image_user} is not the uid:gid this runs as")
    detail = f"runs as uid {uid}, gid {gid}" + (f" (USER {image_user})" if image_user else "")
    if problems:
        detail += ": " + "; ".join(problems)
    return report.add("promise.non_root", not problems, detail, uid=uid, gid=gid, image_user=image_user)


# ---------------------------------------------------------------------------------------- the files
def walk_files(root="/", skip=NOT_IMAGE):
    """(path, lstat) of every file on the image's own filesystem; unreadable directories are yielded as None."""
    root_dev = os.lstat(root).st_dev
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            yield top, None
            continue
        for entry in entries:
            path = entry.path
            if path in skip:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == root_dev:  # another filesystem (a bind mount, /dev/shm) is not the image
                    stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                yield path, st


def setid_files(report, root="/", allowed=SETID_ALLOWED):
    found, unreadable = [], []
    for path, st in walk_files(root):
        if st is None:
            unreadable.append(path)
        elif st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            name = "/" + os.path.relpath(path, root) if root != "/" else path
            if name not in allowed:
                found.append(name)
    found.sort()
    detail = ("no set-user-id or set-group-id file outside the allowlist" if not found
              else f"{len(found)} set-id file(s) outside the allowlist: {', '.join(found[:5])}")
    return report.add("promise.setid", not found, detail, found=found, unreadable=sorted(unreadable)[:20])


def _leftovers(path, keep):
    """What `path` holds beyond the names in `keep`; None if it does not exist."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return None
    return [os.path.join(path, name) for name in sorted(names) if name not in keep]


def home_dirs(passwd="/etc/passwd"):
    homes = {"/root", os.path.expanduser("~")}
    try:
        with open(passwd, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[5].startswith(("/home/", "/root", "/opt", "/srv")):
                    homes.add(fields[5])
    except OSError:
        pass
    if os.path.isdir("/home"):
        homes.update(os.path.join("/home", n) for n in os.listdir("/home"))
    return sorted(h for h in homes if h and h != "/")


def caches_empty(report, must_be_empty=None, apt_caches=APT_BINARY_CACHES, homes=None):
    must_be_empty = MUST_BE_EMPTY if must_be_empty is None else must_be_empty
    homes = home_dirs() if homes is None else homes
    left, unreadable = [], []
    dirs = dict(must_be_empty)
    for home in homes:
        dirs[os.path.join(home, ".cache", "pip")] = set()
    for path, keep in sorted(dirs.items()):
        try:
            found = _leftovers(path, keep)
        except PermissionError:
            unreadable.append(path)
            continue
        left += found or []
    left += [p for p in apt_caches if os.path.exists(p)]
    detail = ("temporary directories and package caches are empty" if not left
              else f"{len(left)} leftover(s): {', '.join(left[:5])}")
    if unreadable:
        detail += f" (not readable by this user: {', '.join(unreadable)})"
    return report.add("promise.clean", not left, detail, leftovers=left[:50], unreadable=unreadable)


def pip_config_secrets(path):
    """The keys of a pip config file that carry a credential; [] for a clean or missing file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except FileNotFoundError:
        return []
    return pip_text_secrets(text)


def pip_text_secrets(text):
    """The keys of a pip config's text that carry a credential (a password, token, client cert, user@ URL)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        return ["(unparsable)"] if USERINFO_URL.search(text) else []
    bad = []
    for section in parser.sections():
        for key, value in parser.items(section):
            if key in PIP_SECRET_KEYS or USERINFO_URL.search(value or ""):
                bad.append(f"{section}.{key}")
    return bad


def docker_config_secrets(text):
    """Where a Docker client config holds a credential: `auths.REGISTRY.auth` and the like ([] for none)."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return ["(unparsable)"] if any(f'"{k}"' in text for k in DOCKER_SECRET_KEYS) else []
    found = []
    auths = data.get("auths") if isinstance(data, dict) else None
    for registry, entry in sorted(auths.items()) if isinstance(auths, dict) else ():
        if isinstance(entry, dict):
            found += [f"auths.{registry}.{k}" for k in DOCKER_SECRET_KEYS if entry.get(k)]
    return found


def credentials_in(read, homes):
    """The credential files under `homes`, read through `read(path) -> bytes or None`.

    certify calls this with the image's files read through the engine, which reads them as root without running
    anything: every home is seen, /root included, which the image's own user cannot open from inside.
    """
    found = []
    for home in homes:
        for name in CREDENTIAL_FILES:
            path = os.path.join(home, name)
            if read(path) is not None:
                found.append(path)
        for name in HOME_PIP_CONFIGS:
            path = os.path.join(home, name)
            data = read(path)
            found += [f"{path} ({key})" for key in pip_text_secrets(data.decode("utf-8", "replace"))] if data else []
        path = os.path.join(home, DOCKER_CONFIG)
        data = read(path)
        found += [f"{path} ({key})" for key in docker_config_secrets(data.decode("utf-8", "replace"))] if data else []
    return found


def passwd_homes(text):
    """Every home an /etc/passwd names (but /), and /root, whoever the image's user is."""
    homes = {"/root"}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and fields[5].startswith("/") and fields[5] != "/":
            homes.add(fields[5].rstrip("/"))
    return sorted(homes)


def pip_configs(homes, environ):
    paths = ["/etc/pip.conf", "/etc/xdg/pip/pip.conf"]
    for d in (environ.get("XDG_CONFIG_DIRS") or "").split(":"):
        if d:
            paths.append(os.path.join(d, "pip", "pip.conf"))
    for home in homes:
        paths += [os.path.join(home, ".pip", "pip.conf"), os.path.join(home, ".config", "pip", "pip.conf")]
    for venv in {environ.get("VIRTUAL_ENV") or "", sys.prefix}:
        if venv:
            paths.append(os.path.join(venv, "pip.conf"))
    if environ.get("PIP_CONFIG_FILE"):
        paths.append(environ["PIP_CONFIG_FILE"])
    return sorted(set(paths))


def credential_files(report, homes=None, environ=None):
    homes = home_dirs() if homes is None else homes
    environ = os.environ if environ is None else environ
    found, unreadable = [], []
    for home in homes:
        for name in CREDENTIAL_FILES:
            path = os.path.join(home, name)
            try:
                os.lstat(path)
                found.append(path)
            except FileNotFoundError:
                pass
            except PermissionError:
                if home not in unreadable:
                    unreadable.append(home)
    for path in pip_configs(homes, environ):
        try:
            keys = pip_config_secrets(path)
        except PermissionError:
            unreadable.append(path)
            continue
        found += [f"{path} ({key})" for key in keys]
    for home in homes:
        path = os.path.join(home, DOCKER_CONFIG)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                found += [f"{path} ({key})" for key in docker_config_secrets(fh.read())]
        except FileNotFoundError:
            pass
        except (PermissionError, NotADirectoryError):
            if home not in unreadable:
                unreadable.append(home)
    detail = ("no .netrc, .pypirc, .git-credentials, credential-bearing pip config or Docker login" if not found
              else f"credentials in the image: {', '.join(found[:5])}")
    if unreadable:
        detail += f" (not readable by this user: {', '.join(unreadable)})"
    return report.add("promise.credentials", not found, detail, found=found, unreadable=unreadable)


# --------------------------------------------------------------------------------- the environment
def environment(report, environ):
    bad = []
    for name, value in sorted(environ.items()):
        if not value:
            continue
        source = name in SOURCE_VARIABLES or name.startswith("PIP_INDEX")
        if SECRET_NAME.search(name) or source or USERINFO_URL.search(value):
            bad.append(name)
    detail = ("no token-like or package-source variable in the environment" if not bad
              else f"the environment holds {', '.join(bad)}")
    return report.add("promise.environment", not bad, detail, variables=bad)  # names only, never values


def timezone(report, tz):
    zones = []
    for moment in SAMPLE_DATES:
        local = time.localtime(moment)
        zones.append((local.tm_gmtoff, local.tm_zone))
    ok = all(offset == 0 and name in UTC_NAMES for offset, name in zones)
    seen = ", ".join(f"{name} {offset:+d} s" for offset, name in zones)
    detail = f"time zone is UTC ({seen})" if ok else f"time zone is not UTC: {seen} (TZ={tz or 'unset'})"
    return report.add("promise.timezone", ok, detail, tz=tz, zones=[name for _, name in zones])


# ---------------------------------------------------------------------------------- the Python side
def pip_check(report, python=None, timeout=300):
    python = python or sys.executable
    try:
        proc = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return report.add("promise.pip_check", False, f"pip check could not run: {exc}")
    out = (proc.stdout + proc.stderr).strip()
    ok = proc.returncode == 0
    first = out.splitlines()[0] if out else f"exit {proc.returncode}"
    return report.add("promise.pip_check", ok, "pip check is clean" if ok else f"pip check: {first}",
                      output=out[-2000:])


def requirement_name(line):
    """`name[extra]==1.0` -> (normalized name, pinned version or None)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==\s*([^\s;,]+))?", line)
    if match is None:
        return None, None
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(2)


def declared_companions(claims):
    """The cell's requirements other than the framework itself and the nvidia-* CUDA library pins."""
    framework = (claims.get("framework") or "").lower()
    out = []
    for line in claims.get("requirements") or []:
        name, version = requirement_name(line)
        if name is None or name == framework or name.startswith(framework + "-") or name.startswith("nvidia-"):
            continue
        out.append((name, version))
    return out


def top_level_modules(dist):
    """The import names a distribution provides: top_level.txt, else the first parts of its files."""
    text = dist.read_text("top_level.txt")
    names = [n.strip() for n in (text or "").splitlines() if n.strip() and not n.strip().startswith("_")]
    if names:
        return sorted(set(names))
    found = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "__pycache__", "bin"):
            continue
        if len(parts) == 1 and parts[0].endswith(".py"):
            found.add(parts[0][:-3])
        elif len(parts) > 1 and parts[-1] == "__init__.py" and len(parts) == 2:
            found.add(parts[0])
    return sorted(n for n in found if n.isidentifier() and not n.startswith("_"))


def companions(report, claims, python=None):
    wanted = declared_companions(claims)
    if not wanted:
        report.skip("promise.companions", "the cell declares no companion packages")
        return True
    ok_all = True
    for name, version in wanted:
        label = f"promise.companion.{name}"
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            ok_all = report.add(label, False, f"{name} is declared but not installed") and ok_all
            continue
        if version is not None and dist.version != version:
            ok_all = report.add(label, False, f"{name} is declared =={version} but {dist.version} is installed",
                                claimed=version, measured=dist.version) and ok_all
            continue
        modules = top_level_modules(dist)
        if not modules:
            ok_all = report.add(label, False, f"{name} {dist.version} provides no module to import") and ok_all
            continue
        code = "; ".join(f"import {m}" for m in modules)
        try:
            proc = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=IMPORT_TIMEOUT_S)
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, why = False, str(exc)
        detail = f"{name} {dist.version} imports ({', '.join(modules)})" if ok else f"import {name} failed: {why}"
        ok_all = report.add(label, ok, detail, modules=modules, version=dist.version) and ok_all
    return ok_all
