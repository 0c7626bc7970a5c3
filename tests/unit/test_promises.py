"""The image promises (builder/smoke/promises.py): each check passes on a clean fixture and fails on a broken one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.smoke import payload, promises


def fresh() -> payload.Report:
    return payload.Report()


def only(report: payload.Report, name: str) -> dict:
    found = [c for c in report.checks if c["name"] == name]
    assert len(found) == 1, report.checks
    return found[0]


def test_root_fails_and_a_numeric_user_passes(monkeypatch):
    monkeypatch.delenv("BUILDER_IMAGE_USER", raising=False)
    report = fresh()
    assert not promises.non_root(report, uid=0, gid=0)
    assert promises.non_root(report, uid=10001, gid=10001)
    assert [c["status"] for c in report.checks] == ["fail", "pass"]
    assert not promises.non_root(fresh(), uid=10001, gid=0)  # root's group is root too


@pytest.mark.parametrize("user,ok", [("10001:10001", True), ("10001", True), ("app", False), ("", False),
                                     ("10002:10001", False), ("0:0", False)])
def test_the_image_user_must_be_numeric_and_the_one_running(user, ok):
    report = fresh()
    assert promises.non_root(report, uid=10001, gid=10001, image_user=user) is ok
    assert only(report, "promise.non_root")["values"]["image_user"] == user


def _tree(root: Path, files: dict[str, int]) -> None:
    for rel, mode in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"#!/bin/sh\n")
        path.chmod(mode)


def test_setid_file_outside_the_allowlist_is_named(tmp_path):
    _tree(tmp_path, {"usr/bin/passwd": 0o4755, "usr/sbin/unix_chkpwd": 0o2755, "usr/bin/ls": 0o755})
    report = fresh()
    assert promises.setid_files(report, root=str(tmp_path))
    _tree(tmp_path, {"opt/venv/bin/helper": 0o4755, "usr/local/bin/g": 0o2755})
    report = fresh()
    assert not promises.setid_files(report, root=str(tmp_path))
    check = only(report, "promise.setid")
    assert check["values"]["found"] == ["/opt/venv/bin/helper", "/usr/local/bin/g"]
    assert "2 set-id file(s) outside the allowlist" in check["detail"]


def test_setid_walk_skips_other_filesystems_and_kernel_views(tmp_path):
    (tmp_path / "proc").mkdir()
    _tree(tmp_path, {"proc/x": 0o4755})
    files = dict(promises.walk_files(str(tmp_path), skip=(str(tmp_path / "proc"),)))
    assert str(tmp_path / "proc" / "x") not in files


def test_leftovers_in_tmp_or_package_caches_fail(tmp_path):
    tmpdir, lists, archives = tmp_path / "tmp", tmp_path / "lists", tmp_path / "archives"
    for d in (tmpdir, lists, archives):
        d.mkdir()
    (lists / "lock").write_text("")
    (archives / "partial").mkdir()
    (tmpdir / "builder-smoke").mkdir()
    dirs = {str(tmpdir): {"builder-smoke"}, str(lists): {"lock", "partial"}, str(archives): {"lock", "partial"},
            str(tmp_path / "absent"): set()}
    home = tmp_path / "home"
    assert promises.caches_empty(fresh(), must_be_empty=dirs, apt_caches=(), homes=[str(home)])
    (home / ".cache" / "pip" / "http").mkdir(parents=True)
    (archives / "python3_3.11.deb").write_text("x")
    (tmpdir / "stray").write_text("x")
    pkgcache = tmp_path / "pkgcache.bin"
    pkgcache.write_text("x")
    report = fresh()
    assert not promises.caches_empty(report, must_be_empty=dirs, apt_caches=(str(pkgcache),), homes=[str(home)])
    left = only(report, "promise.clean")["values"]["leftovers"]
    assert sorted(left) == sorted([str(archives / "python3_3.11.deb"), str(tmpdir / "stray"),
                                   str(home / ".cache" / "pip" / "http"), str(pkgcache)])


def test_credential_files_and_pip_config_with_a_password_fail(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    clean = tmp_path / "clean.conf"
    clean.write_text("[global]\nindex-url = https://pypi.org/simple\ncert = /etc/ssl/certs/ca.pem\n")
    env = {"PIP_CONFIG_FILE": str(clean), "VIRTUAL_ENV": str(tmp_path / "venv")}
    assert promises.credential_files(fresh(), homes=[str(home)], environ=env)
    (home / ".netrc").write_text("machine example.org login u password canary\n")
    (home / ".pypirc").write_text("[pypi]\npassword = canary\n")
    secret = tmp_path / "venv" / "pip.conf"
    secret.parent.mkdir()
    secret.write_text("[global]\nextra-index-url = https://user:canary@example.org/simple\n")
    report = fresh()
    assert not promises.credential_files(report, homes=[str(home)], environ=env)
    check = only(report, "promise.credentials")
    assert check["values"]["found"] == [str(home / ".netrc"), str(home / ".pypirc"),
                                        f"{secret} (global.extra-index-url)"]
    assert "canary" not in json.dumps(check)  # names the file and key, never the secret


@pytest.mark.parametrize("name,value", [
    ("HF_TOKEN", "hf_abc"), ("AWS_SECRET_ACCESS_KEY", "abc"), ("DB_PASSWORD", "abc"), ("OPENAI_API_KEY", "x"),
    ("PIP_INDEX_URL", "https://pypi.org/simple"), ("PIP_EXTRA_INDEX_URL", "https://x.org/simple"),
    ("PIP_FIND_LINKS", "/wheels"), ("PIP_CERT", "/ca.pem"), ("MIRROR", "https://bob:hunter2@mirror.example/simple"),
])
def test_token_like_or_source_variable_fails_and_is_named_without_its_value(name, value):
    env = {"PATH": "/opt/venv/bin:/usr/bin", "LANG": "C.UTF-8", name: value}
    report = fresh()
    assert not promises.environment(report, env)
    check = only(report, "promise.environment")
    assert check["values"]["variables"] == [name]
    assert value not in json.dumps(check)


def test_an_image_environment_passes():
    env = {"PATH": "/opt/venv/bin:/usr/bin", "LANG": "C.UTF-8", "NVIDIA_VISIBLE_DEVICES": "all",
           "NVIDIA_REQUIRE_CUDA": "cuda>=12.1 driver>=525", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
           "VIRTUAL_ENV": "/opt/venv", "PYTHONUNBUFFERED": "1", "HOME": "/home/app", "TZ": "UTC",
           "LD_LIBRARY_PATH": "/opt/cuda-libs/nvidia/cudnn/lib", "PASSTHROUGH": "1", "EMPTY_TOKEN": ""}
    assert promises.environment(fresh(), env)


@pytest.mark.parametrize("tz,ok", [("UTC", True), ("Etc/UTC", True), ("Europe/London", False),
                                   ("America/New_York", False), ("GMT+0", False)])
def test_time_zone_must_be_utc_in_winter_and_summer(monkeypatch, tz, ok):
    if tz.count("/") and not Path("/usr/share/zoneinfo", tz).exists():
        pytest.skip("no tzdata for " + tz)
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        report = fresh()
        assert promises.timezone(report, tz) is ok
    finally:
        monkeypatch.undo()
        time.tzset()
    assert ("time zone is UTC" in only(report, "promise.timezone")["detail"]) is ok


def _python(tmp_path: Path, code: int, out: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\necho '{out}'\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_pip_check_conflict_or_missing_pip_fails(tmp_path):
    assert promises.pip_check(fresh(), python=_python(tmp_path, 0, "No broken requirements found."))
    report = fresh()
    assert not promises.pip_check(report, python=_python(tmp_path, 1, "torchvision 0.19.1 has requirement "
                                                                      "torch==2.4.1, but you have torch 2.5.0."))
    assert only(report, "promise.pip_check")["detail"].startswith("pip check: torchvision 0.19.1 has requirement")
    report = fresh()
    assert not promises.pip_check(report, python=str(tmp_path / "no-such-python"))
    assert "could not run" in only(report, "promise.pip_check")["detail"]


def test_companions_are_the_requirements_beside_the_framework_and_cuda_pins():
    torch = {"framework": "torch", "requirements": ["torch==2.4.1", "torchvision==0.19.1"]}
    assert promises.declared_companions(torch) == [("torchvision", "0.19.1")]
    tf = {"framework": "tensorflow", "requirements": ["tensorflow[and-cuda]==2.20.0",
                                                      "nvidia-cudnn-cu12==9.3.0.75"]}
    assert promises.declared_companions(tf) == []
    assert promises.declared_companions({"framework": "tensorflow", "requirements": ["tensorflow-cpu==2.18.0"]}) == []


def _distribution(site: Path, name: str, version: str, body: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (site / name).mkdir()
    (site / name / "__init__.py").write_text(body)


def test_a_companion_that_is_installed_but_does_not_import_fails(tmp_path, monkeypatch):
    """torchvision was installed in every torch image and never imported: a broken one must fail."""
    site = tmp_path / "site"
    _distribution(site, "goodcomp", "1.0", "VALUE = 1\n")
    _distribution(site, "badcomp", "2.0", "raise ImportError('libpng16.so.16: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    claims = {"framework": "torch", "requirements": ["torch==2.4.1", "goodcomp==1.0", "badcomp==2.0",
                                                     "absentcomp==3.0", "goodcomp==9.9"]}
    report = fresh()
    assert not promises.companions(report, claims)
    got = [(c["name"], c["status"], c["detail"]) for c in report.checks]
    assert got == [
        ("promise.companion.goodcomp", "pass", "goodcomp 1.0 imports (goodcomp)"),
        ("promise.companion.badcomp", "fail", "import badcomp failed: ImportError: libpng16.so.16: cannot open "
                                              "shared object file"),
        ("promise.companion.absentcomp", "fail", "absentcomp is declared but not installed"),
        ("promise.companion.goodcomp", "fail", "goodcomp is declared ==9.9 but 1.0 is installed"),
    ]


def test_payload_runs_the_promises_only_when_asked(tmp_path, monkeypatch):
    for name in ("run", "run_tensorflow"):  # the framework part is not under test here
        monkeypatch.setattr(payload, name, lambda *a, **k: None, raising=False)
    # payload.py imports promises.py from its own folder; walk a small tree, not this whole host
    monkeypatch.setitem(sys.modules, "promises", promises)
    real_walk = promises.walk_files
    monkeypatch.setattr(promises, "walk_files", lambda root="/", skip=(): real_walk(str(tmp_path)))
    out = tmp_path / "r.json"
    payload.main(["--framework", "tensorflow", "--out", str(out), "--promises"])
    names = [c["name"] for c in json.loads(out.read_text())["checks"]]
    for name in ("promise.non_root", "promise.setid", "promise.clean", "promise.credentials", "promise.environment",
                 "promise.timezone", "promise.pip_check", "promise.companions"):
        assert name in names
    payload.main(["--framework", "tensorflow", "--out", str(out)])
    assert not [c for c in json.loads(out.read_text())["checks"] if c["name"].startswith("promise")]


def test_promises_module_stands_alone(tmp_path):
    """It runs in images without builder: standard library only (-S: no site-packages), no builder import."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import promises, payload; r = payload.Report(); "
            "promises.environment(r, {'HF_TOKEN': 'x'}); print(r.checks[0]['status'])")
    proc = subprocess.run([sys.executable, "-S", "-c", code, os.path.dirname(promises.__file__)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fail"
    source = Path(promises.__file__).read_text()
    assert "import builder" not in source and "from builder" not in source
