"""Secrets canary: a build with a canary in every build-time source, then every layer, the config, the history
and the SBOM of the image searched for each canary. It must find none.

Sources: the CA bundle (a comment line), the matrix's own index URL (a token in its path), --index-url (user,
password and a path token), PIP_EXTRA_INDEX_URL from the environment (the same), --find-links as a folder
(its name and a wheel in it) and as a URL (a path token), and two unrelated secrets in the environment. The
indexes are a loopback forwarder to the real index, which records that each source was really used.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import ssl
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder import sbom
from builder.matrix import Selection, expand, load_matrix

from .conftest import REPOSITORY

pytestmark = [pytest.mark.engine, pytest.mark.slow]

UPSTREAM = "https://pypi.org/simple"
CPU_TF = ["--framework", "tensorflow==2.18.0", "--cuda", "cpu", "--python", "3.11"]
TAG = f"{REPOSITORY}/tensorflow:2.18.0-cpu-py3.11-runtime-debian12"


class Forwarder:
    """Loopback PEP 503/691 indexes under secret path prefixes, each forwarding to the real index.

    Records every request's path and Authorization header, so the test knows each source was used.
    """

    def __init__(self, index_tokens: list[str], links_token: str) -> None:
        self.index_tokens = index_tokens
        self.links_token = links_token
        self.seen: list[tuple[str, str]] = []
        self.context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
        forwarder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                forwarder.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        self.seen.append((req.path, req.headers.get("Authorization") or ""))
        parts = req.path.split("?")[0].strip("/").split("/")
        if parts[0] == self.links_token:
            self.send(req, 200, b"<html><body></body></html>\n", "text/html")
            return
        if parts[0] not in self.index_tokens or parts[1:2] != ["simple"]:
            self.send(req, 404, b"not found", "text/plain")
            return
        url = "/".join([UPSTREAM, *parts[2:]]) + "/"
        request = urllib.request.Request(url, headers={"Accept": req.headers.get("Accept") or "text/html"})
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as resp:
                self.send(req, 200, resp.read(), resp.headers.get("Content-Type") or "text/html")
        except urllib.error.HTTPError as exc:
            self.send(req, exc.code, b"", "text/plain")

    @staticmethod
    def send(req: BaseHTTPRequestHandler, code: int, body: bytes, kind: str) -> None:
        req.send_response(code)
        req.send_header("Content-Type", kind)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Chunks(io.RawIOBase):
    """A readable stream over the engine's `docker save` chunks, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        while not self.left:
            try:
                self.left = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(buf), len(self.left))
        buf[:n] = self.left[:n]
        self.left = self.left[n:]
        return n


def count_in(data: bytes, needles: dict[str, list[bytes]]) -> dict[str, int]:
    return {name: sum(data.count(form) for form in forms) for name, forms in needles.items()}


def scan_saved(engine, image_id: str, needles: dict[str, list[bytes]]) -> dict:
    """Every member of `docker save` (each layer, the config, the manifest) searched for every needle."""
    hits: dict[str, list[str]] = {name: [] for name in needles}
    layers, scanned, manifest = 0, 0, b""
    overlap = max(len(f) for forms in needles.values() for f in forms)
    with tarfile.open(fileobj=io.BufferedReader(_Chunks(engine.save(image_id)), 1 << 20), mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            carry = b""
            counts = dict.fromkeys(needles, 0)
            while chunk := fh.read(1 << 20):
                if member.name == "manifest.json":
                    manifest += chunk
                data = carry + chunk
                for name, n in count_in(data, needles).items():
                    counts[name] += n - count_in(carry, {name: needles[name]})[name]
                carry = data[-overlap:]
                scanned += len(chunk)
            for name, n in counts.items():
                if n:
                    hits[name].append(f"{member.name} ({n})")
    if manifest:
        layers = sum(len(m.get("Layers") or []) for m in json.loads(manifest))
    return {"hits": hits, "layers": layers, "bytes": scanned}


def _wheel(folder: Path, canary: str) -> Path:
    """A small valid wheel whose files carry the canary: it sits in the find-links folder, never installed."""
    path = folder / "canarywheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("canarywheel/__init__.py", f"SECRET = {canary!r}\n")
        zf.writestr("canarywheel-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: canarywheel\nVersion: 1.0\n"
                    f"Summary: {canary}\n")
        zf.writestr("canarywheel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("canarywheel-1.0.dist-info/RECORD", "")
    return path


def _canary_matrix(work, tmp_path: Path, port: int, token: str) -> Path:
    """The test matrix with an index whose path holds a token, used by the TF 2.18 CPU build line."""
    text = work.matrix.read_text()
    text, n = re.subn(r"(?m)^indexes:\n", f"indexes:\n  canary: http://127.0.0.1:{port}/{token}/simple\n", text, count=1)
    assert n == 1
    start = text.index('      "2.18.0":')
    end = text.index("cpu: {}", start)
    text = text[:end] + "cpu: {index: canary}" + text[end + len("cpu: {}"):]
    path = tmp_path / "canary.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("form", ["stage", "direct"])
def test_no_build_time_source_reaches_the_image(engine, work, tmp_path, form):
    """`stage`: --no-proxy, pip in a builder stage with the CA bundle and pip.conf; `direct`: the default, uv
    in the final stage through the package proxy, which holds the sources on the host."""
    canary = {k: f"canary{k}{secrets.token_hex(8)}" for k in (
        "cabundle", "matrixpath", "indexuser", "indexpass", "indexpath", "extrauser", "extrapass", "extrapath",
        "linksdir", "linkswheel", "linksurl", "envsecret", "envtoken")}
    forwarder = Forwarder([canary["matrixpath"], canary["indexpath"], canary["extrapath"]], canary["linksurl"])
    try:
        port = forwarder.port
        matrix = _canary_matrix(work, tmp_path, port, canary["matrixpath"])
        source = Path(os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile
                      or "/etc/ssl/certs/ca-certificates.crt")
        ca = tmp_path / "ca.pem"
        ca.write_bytes(source.read_bytes() + f"\n# {canary['cabundle']}\n".encode())
        links = tmp_path / canary["linksdir"]
        links.mkdir()
        _wheel(links, canary["linkswheel"])
        index = f"http://{canary['indexuser']}:{canary['indexpass']}@127.0.0.1:{port}/{canary['indexpath']}/simple"
        extra = f"http://{canary['extrauser']}:{canary['extrapass']}@127.0.0.1:{port}/{canary['extrapath']}/simple"
        env = {"PIP_EXTRA_INDEX_URL": extra, "PIP_FIND_LINKS": "", "BUILDER_CANARY_SECRET": canary["envsecret"],
               "HF_TOKEN": canary["envtoken"]}
        started = time.monotonic()
        work.cli("build", *CPU_TF, "--force", *(["--no-proxy"] if form == "stage" else []), "--ca-bundle", str(ca),
                 "--index-url", index,
                 "--find-links", str(links), "--find-links", f"http://127.0.0.1:{port}/{canary['linksurl']}/",
                 matrix=matrix, env=env, check=True)
        build_s = time.monotonic() - started
    finally:
        forwarder.close()
    # Each source was really used: the builder stage or the proxy reached every index and the find-links URL.
    paths = " ".join(p for p, _ in forwarder.seen)
    for key in ("matrixpath", "indexpath", "extrapath", "linksurl"):
        assert f"/{canary[key]}/" in paths, (key, forwarder.seen[:5])
    auths = {a for _, a in forwarder.seen if a}
    for user, password in (("indexuser", "indexpass"), ("extrauser", "extrapass")):
        basic = "Basic " + base64.b64encode(f"{canary[user]}:{canary[password]}".encode()).decode()
        assert basic in auths, (user, auths)

    info = engine.image(TAG)
    assert info is not None
    needles = {k: [v.encode()] for k, v in canary.items()}
    # A control that IS in the image (cell.json's layer, the labels, the LABEL step, the SBOM's image
    # properties): the scan must find it everywhere, or a 0 below would prove nothing.
    needles["control"] = [TAG.encode()]
    for user, password in (("indexuser", "indexpass"), ("extrauser", "extrapass")):  # as an Authorization header
        needles[user].append(base64.b64encode(f"{canary[user]}:{canary[password]}".encode()))
    started = time.monotonic()
    saved = scan_saved(engine, info.id, needles)
    config = json.dumps(engine.api.inspect_image(info.id)).encode()
    history = json.dumps(engine.history(info.id)).encode()
    assert (b"packages.builder.invalid" in history) == (form == "direct"), "the build took the other form"
    cells, _ = expand(load_matrix(matrix), Selection(framework="tensorflow", framework_version="2.18.0", cuda="cpu",
                                                     python="3.11"))
    bom, counts = sbom.generate(lambda p: engine.read_file(info.id, p), cells[0], info.id, datetime.now(timezone.utc))
    scan_s = time.monotonic() - started
    found = {name: list(where) for name, where in saved["hits"].items()}
    for label, data in (("config", config), ("history", history), ("sbom", bom.encode())):
        for name, n in count_in(data, needles).items():
            if n:
                found[name].append(f"{label} ({n})")
    control = found.pop("control")
    assert [w for w in control if w.endswith(".tar (1)") or "layer" in w or "blobs" in w], control
    assert {w.split(" ")[0] for w in control} >= {"config", "history", "sbom"}, control
    leaks = {name: where for name, where in found.items() if where}
    print(f"\ncanary scan ({form}): build {build_s:.0f} s; {saved['layers']} layers, {saved['bytes'] / 1e6:,.0f} MB saved "
          f"image, config, history and SBOM ({counts['python']} Python, {counts['deb']} deb components) searched "
          f"for {len(needles) - 1} canaries in {scan_s:.0f} s: {sum(len(w) for w in leaks.values())} hit(s) {leaks}; "
          f"the control found in {control}")
    assert saved["layers"] > 0 and saved["bytes"] > 100_000_000
    assert leaks == {}
