"""Rendering: golden Dockerfiles, what a context holds, and the content hash."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.render import DEFAULT_SOURCES, content_hash, dockerfile, render

from .golden import CELLS, GOLDEN, cell


@pytest.mark.parametrize("direct", [False, True], ids=["stage", "direct"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_dockerfile_matches_golden(name, direct):
    expected = (GOLDEN / f"{name}{'.direct' if direct else ''}.Dockerfile").read_text()
    assert dockerfile(cell(name), direct=direct) == expected, f"run `make golden` if the change to {name} is deliberate"


def test_a_direct_build_has_no_builder_stage_and_names_no_source():
    """The direct form installs in the final stage from PACKAGES_HOST (reached through http_proxy): no stage to
    copy from, no sources/ in the context it needs, and the CUDA layer before the environment's."""
    ctx = render(cell("torch-2.4.1-cuda12.1-py3.11"))
    assert ctx.direct is not None and ctx.build_files(True)["Dockerfile"] == ctx.direct
    assert ctx.build_files(False)["Dockerfile"] == ctx.files["Dockerfile"]
    text = ctx.direct.decode()
    assert text.count("\nFROM ") == 2 and "AS builder" not in text and "COPY --from" not in text
    assert "/opt/builder-sources" not in text and "127.0.0.1" not in text and "pip.conf" not in text
    cuda = text.index("--target /opt/cuda-libs --no-deps")
    venv = text.index("-m venv --without-pip /opt/venv")
    assert cuda < venv < text.index("COPY cell.json")
    assert "printf '%s\\n' 'torch==2.4.1' 'torchvision==0.19.1'" in text
    cpu = render(cell("torch-2.4.1-cpu-py3.11")).direct
    assert cpu is not None and b"--target /opt/cuda-libs" not in cpu  # no CUDA layer where no nvidia-* wheel is


def test_the_hash_covers_both_forms_and_a_cell_without_uv_has_no_direct_form():
    import dataclasses

    from builder.render import content_hash

    c = cell("torch-2.4.1-cuda12.1-py3.11")
    ctx = render(c)
    assert ctx.content_hash != content_hash(ctx.files, c.base.image)  # the direct form is hashed too
    plain = render(dataclasses.replace(c, installer=None))
    assert plain.direct is None and plain.content_hash == content_hash(plain.files, c.base.image)
    assert "installer.txt" not in plain.files and b"uv pip" not in plain.files["Dockerfile"]


def test_context_holds_dockerfile_requirements_and_claims_but_not_the_payload():
    ctx = render(cell("torch-2.4.1-cuda12.1-py3.11"))
    # certify brings the payload at run time: a new check must not change every image's hash
    assert set(ctx.files) == {"Dockerfile", "requirements.txt", "cell.json", "installer.txt"}
    assert ctx.files["requirements.txt"] == b"torch==2.4.1\ntorchvision==0.19.1\n"
    claims = json.loads(ctx.files["cell.json"])
    assert claims["cuda"] == "12.1" and claims["cudnn"] == "9.1.0.70" and claims["python"] == "3.11"
    assert claims["tag"] == "builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12"


def test_write_adds_default_sources_so_plain_docker_build_works(tmp_path):
    ctx = render(cell("torch-2.4.1-cpu-py3.11"))
    target = ctx.write(tmp_path)
    for rel in [*ctx.files, *DEFAULT_SOURCES]:
        assert (target / rel).is_file(), rel


def test_hash_is_stable_and_sensitive():
    c = cell("torch-2.4.1-cuda12.1-py3.11")
    first, second = render(c), render(c)
    assert first.content_hash == second.content_hash
    # at build time the hash covers the base image the engine holds: a base that moved is a change
    assert render(c, base_id="sha256:1").content_hash != render(c, base_id="sha256:2").content_hash
    assert render(c, base_id="sha256:1").content_hash != first.content_hash
    # a pinned value: the hash must not depend on the machine, the time or dict order
    hashed = {"Dockerfile.direct": first.direct, **first.files}
    assert first.content_hash == content_hash(dict(reversed(list(hashed.items()))), c.base.image)
    other_base = dataclasses.replace(c, base=dataclasses.replace(c.base, image="debian:bookworm"))
    assert render(other_base).content_hash != first.content_hash
    other_req = dataclasses.replace(c, requirements=("torch==2.4.0",))
    assert render(other_req).content_hash != first.content_hash


def test_final_stage_sees_no_build_sources():
    text = dockerfile(cell("tensorflow-2.18.0-cuda12.5-py3.11"))
    final = text[text.rindex("\nFROM os\n"):]
    assert "builder-sources" not in final and "COPY sources" not in final
    assert "COPY --from=builder /opt/builder-venv/ /" in final  # the venv, rooted at / with fixed times
    assert "USER 10001:10001" in final


def test_templates_hold_no_versions():
    import re

    from builder.render import TEMPLATES

    for path in TEMPLATES.rglob("*.j2"):
        text = path.read_text()
        assert not re.search(r"\b\d+\.\d+\.\d+\b", text), path
        assert not re.search(r"(python|cuda|torch|tensorflow)\s*[=:]?\s*\d+\.\d+", text, re.I), path


def test_wheel_toolchain_is_held_to_the_runtime_pins_and_layers_are_time_free():
    """nvcc's wheel asks for nvidia-cuda-runtime unpinned: without the venv's lock as a constraint, pip --target
    took the newest (13.5) and its headers overwrote torch's 13.0 ones in CUDA_HOME (CCCL then refuses every .cu)."""
    text = dockerfile(cell("torch-2.11.0-cuda13.0-py3.11-devel-wheels"))
    toolchain = text[text.index("AS toolchain"):text.index("\nFROM os\n")]
    assert "-r /opt/builder-sources/requirements-devel.txt \\\n      -c /opt/venv/requirements.lock" in toolchain
    # every tree the final stage copies has its times zeroed and is rooted at /, so /opt carries no build time
    final = text[text.rindex("\nFROM os\n"):]
    for tree in ("builder-export", "builder-venv", "builder-toolchain"):
        assert f"/opt/{tree}/ /" in final and f"find /opt/{tree} -exec touch -h -d @0" in text, tree
    assert "COPY --from=builder /opt/venv" not in final


def _uv_fetch(cell_name: str, tools: Path) -> str:
    """The rendered direct form's uv fetch (its `python3 -c '...'`, lines joined as the Dockerfile parser joins
    them), writing under `tools` instead of /tmp/builder-tools."""
    text = dockerfile(cell(cell_name), direct=True).replace("\\\n", "")
    code = re.search(r"python3 -c '([^']*)'", text)
    assert code is not None
    return code[1].replace("/tmp/builder-tools", str(tools))


class _Packages(BaseHTTPRequestHandler):
    """packages.builder.invalid as a forward proxy sees it: the merged uv page and its wheels."""
    files: dict[str, bytes] = {}
    page = ""

    def do_GET(self) -> None:
        path = self.path.removeprefix("http://packages.builder.invalid")
        body = self.page.encode() if path == "/simple/uv/" else self.files.get(path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


def _wheel(version: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"uv-{version}.data/scripts/uv", payload)
        z.writestr(f"uv-{version}.dist-info/METADATA", "Name: uv\n")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["right wheel", "hash mismatch", "no wheel", "unhashed first", "unhashed only"])
def test_the_direct_form_takes_uv_for_this_machine_checked_against_the_index_hash(tmp_path, case):
    """The uv fetch as the image's Python runs it: of the pinned release, the manylinux wheel for this machine
    (never musllinux, another release or another machine), its sha256 checked, its binary made executable."""
    version = "0.13.8"
    machine = platform.machine()
    other = "aarch64" if machine != "aarch64" else "x86_64"
    right = _wheel(version, b"#!/bin/sh\necho right\n")
    decoys = {
        f"uv-{version}-py3-none-musllinux_1_1_{machine}.whl": _wheel(version, b"musl"),
        f"uv-{version}-py3-none-manylinux_2_17_{other}.manylinux2014_{other}.whl": _wheel(version, b"other arch"),
        f"uv-0.13.80-py3-none-manylinux_2_17_{machine}.whl": _wheel("0.13.80", b"other release"),
    }
    # uv's own aarch64 wheel names both tags: manylinux2014_aarch64.musllinux_1_1_aarch64
    tags = f"manylinux_2_17_{machine}.manylinux2014_{machine}" + (".musllinux_1_1_aarch64" if machine == "aarch64" else "")
    name = f"uv-{version}-py3-none-{tags}.whl"
    wheels = {**decoys, name: right} if case != "no wheel" else decoys
    digest = hashlib.sha256(b"tampered" if case == "hash mismatch" else right).hexdigest().upper()  # either case
    anchors = [f'<a href="/files/T{i}/{n}#sha256={hashlib.sha256(w).hexdigest() if n != name else digest}">{n}</a>'
               for i, (n, w) in enumerate(wheels.items())]
    if case == "unhashed only":
        # a link to the wheel's metadata file with that file's hash: the hash is never taken for the wheel's
        metadata = hashlib.sha256(b"Name: uv\n").hexdigest()
        anchors = [f'<a href="/links/0/{name}.metadata#sha256={metadata}">m</a>', f'<a href="/links/0/{name}">{name}</a>']
        _Packages.files = {f"/links/0/{name}": right}
    else:
        _Packages.files = {f"/files/T{i}/{n}": w for i, (n, w) in enumerate(wheels.items())}
    if case == "unhashed first":  # a local wheelhouse's tampered copy listed before the index's hashed link
        anchors.insert(0, f'<a href="/links/0/{name}">{name}</a>')
        _Packages.files[f"/links/0/{name}"] = _wheel(version, b"tampered")
    _Packages.page = "<html><body>\n" + "<br/>\n".join(anchors) + "\n</body></html>\n"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Packages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run([sys.executable, "-c", _uv_fetch("torch-2.4.1-cuda12.1-py3.11", tmp_path)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "http_proxy": f"http://127.0.0.1:{server.server_port}", "no_proxy": ""})
    finally:
        server.shutdown()
        server.server_close()
    uv = tmp_path / "uv" / "bin" / "uv"
    if case in ("right wheel", "unhashed first", "unhashed only"):
        assert proc.returncode == 0, proc.stderr
        assert uv.read_bytes() == b"#!/bin/sh\necho right\n" and os.access(uv, os.X_OK)
        assert ("is not checked" in proc.stderr) == (case == "unhashed only")
    else:
        assert proc.returncode != 0 and not uv.exists()
        expected = "fails its sha256" if case == "hash mismatch" else f"no uv {version} wheel for {machine}"
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts}


def _has_ensurepip(python: str) -> bool:
    return Path(python).exists() and subprocess.run([python, "-c", "import ensurepip"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_ensurepip("/usr/bin/python3"), reason="needs the distribution's Python with its venv")
def test_the_direct_form_seeds_its_venv_as_python_m_venv_does(tmp_path):
    """The venv is made --without-pip and the Python's own ensurepip then picks the wheels and the arguments,
    with uv installing where ensurepip would run pip (and compile every .pyc). Run as rendered on this host's
    distribution Python, it must give what `python -m venv` gives: the same packages and versions, and the same
    file names outside __pycache__ (pip's scripts included; RECORD and INSTALLER name uv), none of uv's own."""
    import shutil

    uv = str(Path(sys.executable).with_name("uv"))  # the dev install's uv, pinned as the matrix's installer
    uv = uv if Path(uv).exists() else shutil.which("uv") or uv
    text = dockerfile(cell("torch-2.4.1-cuda12.1-py3.11"), direct=True).replace("\\\n", " ")
    start = text.index("python3 -m venv --without-pip /opt/venv")
    seed = text[start:text.index("&& /tmp/builder-tools/uv/bin/uv pip freeze --python /opt/venv/bin/python", start)]
    seed = (seed.replace("/opt/venv", str(tmp_path / "seeded")).replace("/tmp/builder-tools/uv/bin/uv", uv)
            .replace("python3 -m venv", "/usr/bin/python3 -m venv"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run(["sh", "-ec", seed], check=True, env={**env, "UV_NO_CACHE": "1"}, timeout=120)
    # seeded again a moment later at the same path: the same bytes (uv notes a local wheel's time), so every
    # build of a venv layer gives the same layer, and RECORD names only files that are there
    first = _files(tmp_path / "seeded")
    shutil.rmtree(tmp_path / "seeded")
    time.sleep(1.1)
    subprocess.run(["sh", "-ec", seed], check=True, env={**env, "UV_NO_CACHE": "1"}, timeout=120)
    assert _files(tmp_path / "seeded") == first
    for record in (tmp_path / "seeded").glob("lib/python3*/site-packages/*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            assert (record.parent.parent / line.rsplit(",", 2)[0]).exists() or "__pycache__" in line, line
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(tmp_path / "plain")], check=True, env=env, timeout=120)

    def freeze(venv: str) -> str:
        return subprocess.run([str(tmp_path / venv / "bin" / "pip"), "freeze", "--all"], check=True, text=True,
                              capture_output=True, env=env, timeout=60).stdout

    assert freeze("seeded") == freeze("plain") and "pip==" in freeze("seeded")
    # uv installed them (a fall-back to ensurepip's pip run would pass the rest, only slower)
    installers = {p.read_text().strip() for p in (tmp_path / "seeded").glob("lib/python3*/site-packages/*.dist-info/INSTALLER")}
    assert installers == {"uv"}
    # what seeds the resolution's output file: uv's freeze of the venv, as pip's would list it (no pip run)
    seeds = subprocess.run([uv, "pip", "freeze", "--python", str(tmp_path / "seeded" / "bin" / "python")], check=True,
                           text=True, capture_output=True, env=env, timeout=60).stdout
    assert seeds == freeze("seeded")
    assert _tree(tmp_path / "seeded") == _tree(tmp_path / "plain")


@pytest.mark.parametrize("name", ["torch-2.4.1-cuda12.1-py3.11", "torch-2.4.1-cpu-py3.11"])
@pytest.mark.parametrize("check_rc", [0, 1])
def test_the_venv_step_fails_when_pip_check_fails_though_it_runs_beside_freeze(tmp_path, name, check_rc):
    """pip check runs in the background while pip freeze writes the lock: its status must still decide the step,
    and its words reach the log. The rendered lines run under sh with a stand-in pip."""
    text = dockerfile(cell(name), direct=True).replace("\\\n", " ")
    start = text.index("{ /opt/venv/bin/pip check")
    tail = text[start:text.index("&& find /opt/venv -name __pycache__", start)]
    venv, tools = tmp_path / "venv", tmp_path / "tools"
    (venv / "bin").mkdir(parents=True)
    tools.mkdir()
    pins = "nvidia-cudnn-cu12==9.1.0.70\n" if "cuda" in name else ""
    (tools / "lock.txt").write_text(f"{pins}torch==2.4.1\n")
    pip = venv / "bin" / "pip"
    pip.write_text(f"""#!/bin/sh
if [ "$1" = check ]; then sleep 0.3; echo {'"No broken requirements found."' if check_rc == 0 else
    '"torch 2.4.1 has requirement sympy, which is not installed."'}; exit {check_rc}; fi
printf '{pins.replace(chr(10), chr(92) + "n")}Torch==2.4.1\\n'
""")
    pip.chmod(0o755)
    script = tail.replace("/opt/venv", str(venv)).replace("/tmp/builder-tools", str(tools))
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert (venv / "requirements.lock").read_text() == f"{pins}Torch==2.4.1\n"
    if check_rc == 0:
        assert done.returncode == 0 and "No broken requirements found." in done.stdout, done
    else:
        assert done.returncode == 1 and "has requirement sympy" in done.stderr, done
