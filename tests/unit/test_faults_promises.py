"""Credentials wherever a home is: /root included, which the image's own user cannot open, read by certify
through the engine; and the Docker client's config, a credential file that was not looked at before."""

from __future__ import annotations

import json

from builder.smoke import promises

from .test_certify_promises import certify, checks
from .test_sbom import image_files

PASSWD = (b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          b"app:x:10001:10001::/home/app:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
DOCKER_LOGIN = json.dumps({"auths": {"registry.example": {"auth": "dXNlcjpwYXNz"}}}).encode()


def test_every_home_of_the_passwd_and_root_are_looked_at():
    assert promises.passwd_homes(PASSWD.decode()) == ["/home/app", "/nonexistent", "/root", "/usr/sbin"]
    assert promises.passwd_homes("garbage\n") == ["/root"]  # /root whatever the file says


def test_credentials_are_found_in_every_home_by_path_and_key_never_by_content():
    files = {
        "/root/.netrc": b"machine x login u password SECRET",
        "/root/.pip/pip.conf": b"[global]\npassword = SECRET\n",
        "/root/.config/pip/pip.conf": b"[global]\nindex-url = https://u:SECRET@index.example/simple\n",
        "/root/.docker/config.json": DOCKER_LOGIN,
        "/home/app/.git-credentials": b"https://u:SECRET@example",
        "/home/app/.docker/config.json": json.dumps({"auths": {"r.example": {}}, "credsStore": "pass"}).encode(),
        "/home/app/.config/pip/pip.conf": b"[global]\nindex-url = https://pypi.org/simple\n",
    }
    found = promises.credentials_in(files.get, ["/home/app", "/root"])
    assert found == ["/home/app/.git-credentials", "/root/.netrc", "/root/.pip/pip.conf (global.password)",
                     "/root/.config/pip/pip.conf (global.index-url)",
                     "/root/.docker/config.json (auths.registry.example.auth)"]
    assert "SECRET" not in json.dumps(found)
    assert promises.credentials_in({}.get, ["/root"]) == []


def test_a_docker_login_in_a_readable_home_breaks_the_payloads_own_promise(tmp_path):
    class Report:
        def add(self, name, ok, detail, **values):
            self.seen = (name, ok, detail)
            return ok

    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_bytes(DOCKER_LOGIN)
    report = Report()
    assert promises.credential_files(report, homes=[str(tmp_path)], environ={}) is False
    assert f"{tmp_path}/.docker/config.json (auths.registry.example.auth)" in report.seen[2]


def test_credentials_under_root_fail_the_image_though_its_user_cannot_see_them(tmp_path):
    # The payload ran as uid 10001 and passed promise.credentials: /root is closed to it. certify reads the image
    # through the engine, as root, and finds what is there.
    files = {**image_files(), "/etc/passwd": PASSWD, "/root/.netrc": b"machine x password SECRET",
             "/root/.docker/config.json": DOCKER_LOGIN}
    _, res, cert = certify(tmp_path, checks(), files=files)
    assert res.level == "failed" and cert["level"] == "failed"
    [check] = [c for c in cert["checks"] if c["name"] == "promise.credentials.all_homes"]
    assert check["status"] == "fail"
    assert check["values"]["found"] == ["/root/.netrc", "/root/.docker/config.json (auths.registry.example.auth)"]
    assert "promise.credentials.all_homes: credentials in the image: /root/.netrc" in cert["reasons"][0]
    assert "SECRET" not in json.dumps(cert)


def test_a_clean_image_passes_with_every_home_named(tmp_path):
    _, res, cert = certify(tmp_path, checks(), files={**image_files(), "/etc/passwd": PASSWD})
    [check] = [c for c in cert["checks"] if c["name"] == "promise.credentials.all_homes"]
    assert res.level == "cpu-verified" and check["status"] == "pass"
    assert check["values"]["homes"] == ["/home/app", "/nonexistent", "/root", "/usr/sbin"]
