"""The bench's own code, without builds: its matrices, the naive recipe, the floor, the verdicts and the table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from builder.matrix import expand, load_matrix
from tests import bench

ROOT = Path(__file__).resolve().parents[2]


def test_small_matrix_has_ten_tiny_cells(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(bench.small_matrix((ROOT / "matrix.yaml").read_text()))
    cells, _ = expand(load_matrix(str(path)))
    assert len(cells) == 10
    assert {c.requirements for c in cells} == {(f"six=={v}",) for v in bench.SMALL_VERSIONS}
    assert all(c.tag.startswith("bench-small/") for c in cells)


def test_synthetic_matrix_is_about_a_thousand_valid_cells(tmp_path: Path) -> None:
    path = tmp_path / "synthetic.yaml"
    path.write_text(bench.synthetic_matrix((ROOT / "matrix.yaml").read_text(), copies=11))
    real, _ = expand(load_matrix(str(ROOT / "matrix.yaml")))
    cells, _ = expand(load_matrix(str(path)))
    assert len(cells) == 12 * len(real)
    assert len({c.tag for c in cells}) == len(cells)


def test_naive_recipe_is_single_stage_with_the_pins_and_the_ca_bundle() -> None:
    text = bench.naive_dockerfile("debian:bookworm-slim", ["torch==2.4.1"])
    assert text.count("FROM ") == 1 and text.startswith("FROM debian:bookworm-slim\n")
    assert "pip install --no-cache-dir torch==2.4.1" in text
    assert "COPY ca.pem" in text and "PIP_CERT=" in text


def test_floor_counts_base_python_and_environment_layers_only() -> None:
    history = [
        {"CreatedBy": "/bin/sh -c #(nop)  LABEL org.builder.tag=x", "Size": 0},
        {"CreatedBy": "/bin/sh -c #(nop) COPY file:abc in /opt/builder/cell.json", "Size": 7},  # the claims
        {"CreatedBy": "/bin/sh -c useradd --uid 10001 --user-group --create-home app", "Size": 9},
        {"CreatedBy": "/bin/sh -c #(nop) COPY dir:93c2ea30 in /opt/venv", "Size": 1000},  # the builder stage's venv
        {"CreatedBy": "/bin/sh -c apt-get update && apt-get install -y python3 python3-venv", "Size": 100},
        {"CreatedBy": "", "Size": 50},  # an imported base has no CreatedBy
        # a direct build's two install steps (the CUDA libraries, the environment): RUN layers, counted
        {"CreatedBy": "|0 /bin/sh -c export UV_INDEX_URL=http://packages.builder.invalid/simple UV_NO_CACHE=1 "
                      "&& python3 -m venv /opt/venv", "Size": 2000},
    ]
    assert bench.floor_bytes(history) == 3150


# Per-file upstream bytes as a build record keeps them (`fetched_files`): a TensorFlow CPU cell on 3.11, then
# its sibling on 3.9 through the same package cache.
FIRST = {"tensorflow_cpu-2.18.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": 230_146_743,
         "tensorflow_cpu-2.18.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl.metadata": 3_412,
         "numpy-2.0.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": 19_505_117,
         "keras-3.7.0-py3-none-any.whl": 1_228_420,
         "absl_py-2.1.0-py3-none-any.whl": 133_706}
SECOND = {"tensorflow_cpu-2.18.0-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": 230_083_100,
          "tensorflow_cpu-2.18.0-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl.metadata": 3_412,
          "numpy-2.0.2-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": 19_512_410,
          "importlib_metadata-8.5.0-py3-none-any.whl": 26_284}  # a backport only 3.9 needs


def test_a_sibling_that_fetches_only_cp_tagged_files_again_meets_the_target() -> None:
    again = bench.twice_fetched(FIRST, SECOND)
    assert set(again.cp) == {n for n in SECOND if "-cp39-" in n}
    assert again.same == {} and again.versions == {} and again.debs == {}
    assert again.new == {"importlib_metadata-8.5.0-py3-none-any.whl": 26_284}
    assert again.met is True


def test_a_pure_wheel_fetched_again_or_the_same_file_twice_misses_the_target() -> None:
    second = {**SECOND,
              "keras-3.6.0-py3-none-any.whl": 1_200_000,  # another version of a project the first fetched
              "numpy-2.0.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": 19_505_117}  # cache miss
    again = bench.twice_fetched(FIRST, second)
    assert again.versions == {"keras-3.6.0-py3-none-any.whl": 1_200_000}
    assert again.same == {"numpy-2.0.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": 19_505_117}
    assert again.met is False
    assert bench.twice_fetched(FIRST, {**SECOND, "keras-3.6.0-py3-none-any.whl": 1_200_000}).met is False


def test_another_version_the_siblings_python_needs_is_expected() -> None:
    """filelock 4.x requires Python 3.10: a 3.9 sibling must fetch a 3.x, which is no miss of the cache. Where the
    first's version would install on 3.9 too, or its Requires-Python is unknown, it still counts."""
    first = {**FIRST, "filelock-4.3.2-py3-none-any.whl": 16_000, "fsspec-2026.9.0-py3-none-any.whl": 200_000}
    second = {**SECOND, "filelock-3.19.1-py3-none-any.whl": 16_000, "fsspec-2025.10.0-py3-none-any.whl": 190_000}
    requires = {"filelock-4.3.2-py3-none-any.whl": ">=3.10", "fsspec-2026.9.0-py3-none-any.whl": ">=3.9"}.get
    again = bench.twice_fetched(first, second, "3.9", requires)
    assert again.python == {"filelock-3.19.1-py3-none-any.whl": 16_000}
    assert again.versions == {"fsspec-2025.10.0-py3-none-any.whl": 190_000}
    assert again.met is False
    del second["fsspec-2025.10.0-py3-none-any.whl"]
    assert bench.twice_fetched(first, second, "3.9", requires).met is True
    assert bench.twice_fetched(first, second, "3.9").met is False  # unknown: counted against the target
    rows = bench.sibling_rows({"first": {"tag": "a", "fetched_files": first, "upstream_bytes": 1},
                               "second": {"tag": "b", "fetched_files": second, "upstream_bytes": 1,
                                          "cell": {"python": "3.9"}}}, None, requires_python=requires)
    assert rows[0].met is True and "filelock-3.19.1-py3-none-any.whl (the first: filelock-4.3.2" in rows[0].note


def test_another_releases_debs_are_listed_but_not_counted() -> None:
    # The sibling's Python comes with its base: Debian 11's apt packages where the first had Debian 12's.
    first = {**FIRST, "openssl_3.0.17-1~deb12u2_amd64.deb": 1_434_000}
    second = {**SECOND, "openssl_1.1.1w-0%2bdeb11u1_amd64.deb": 863_000,
              "python3.9-minimal_3.9.2-1_amd64.deb": 2_010_000}
    again = bench.twice_fetched(first, second)
    assert again.debs == {"openssl_1.1.1w-0%2bdeb11u1_amd64.deb": 863_000}
    assert "python3.9-minimal_3.9.2-1_amd64.deb" in again.new
    assert again.met is True


def test_projects_are_named_as_pep_503_names_them() -> None:
    assert bench.project_of("Absl_Py-2.1.0-py3-none-any.whl") == "absl-py"
    assert bench.project_of("absl-py-2.1.0.tar.gz") == "absl-py"
    assert bench.project_of("tensorflow_cpu-2.18.0-cp39-cp39-manylinux2014_x86_64.whl.metadata") == "tensorflow-cpu"
    assert bench.project_of("python3.11_3.11.2-6+deb12u6_amd64.deb") == "python3.11"


# `docker history` of a built cell (newest first, as the SDK returns it) and its image's RootFS diff ids: the
# final `true` entry is the builder's label commit, which made no layer.
HISTORY = [
    {"CreatedBy": "true", "Size": 0},
    {"CreatedBy": "/bin/sh -c #(nop)  LABEL org.builder.hash=78a0d70e", "Size": 0},
    {"CreatedBy": "/bin/sh -c #(nop)  CMD [\"python\"]", "Size": 0},
    {"CreatedBy": "/bin/sh -c #(nop) WORKDIR /home/app", "Size": 0},
    {"CreatedBy": "/bin/sh -c #(nop)  USER 10001:10001", "Size": 0},
    {"CreatedBy": "/bin/sh -c #(nop) COPY file:d87100725c49 in /opt/builder/cell.json", "Size": 761},
    {"CreatedBy": "/bin/sh -c #(nop)  ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin", "Size": 0},
    {"CreatedBy": "|0 /bin/sh -c export UV_INDEX_URL=http://packages.builder.invalid/simple", "Size": 2_354_208_490},
    {"CreatedBy": "|0 /bin/sh -c export UV_INDEX_URL=http://packages.builder.invalid/simple", "Size": 2_842_929_167},
    {"CreatedBy": "|0 /bin/sh -c useradd --uid 10001 --user-group --create-home --shell /bin/bash app",
     "Size": 8_894},
    {"CreatedBy": "|0 /bin/sh -c apt-get update  && apt-get install -y --no-install-recommends python3",
     "Size": 54_327_340},
    {"CreatedBy": "/bin/sh -c #(nop)  ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8", "Size": 0},
    {"CreatedBy": "/bin/sh -c #(nop)  LABEL org.builder.managed=true", "Size": 0},
    {"CreatedBy": "", "Size": 106_238_648},  # the imported base
]
DIFF_IDS = ["sha256:d21d66a4", "sha256:33796992", "sha256:af9438e9", "sha256:3e3a9569", "sha256:5c396495",
            "sha256:0aaae344"]


def test_layers_pair_history_sizes_with_diff_ids_oldest_first() -> None:
    assert bench.layer_sizes(HISTORY, DIFF_IDS) == [
        ("sha256:d21d66a4", 106_238_648), ("sha256:33796992", 54_327_340), ("sha256:af9438e9", 8_894),
        ("sha256:3e3a9569", 2_842_929_167), ("sha256:5c396495", 2_354_208_490), ("sha256:0aaae344", 761)]


def test_a_run_that_wrote_nothing_is_the_empty_layer_of_no_bytes() -> None:
    history = [{"CreatedBy": "/bin/sh -c true", "Size": 0}, {"CreatedBy": "", "Size": 100}]
    assert bench.layer_sizes(history, ["sha256:base", bench.EMPTY_LAYER]) == [("sha256:base", 100),
                                                                              (bench.EMPTY_LAYER, 0)]


def test_layers_that_do_not_pair_up_are_an_error() -> None:
    import pytest

    with pytest.raises(ValueError, match="diff ids"):
        bench.layer_sizes(HISTORY, DIFF_IDS[:4])


def test_a_layer_shared_by_diff_id_counts_once() -> None:
    first = [("sha256:base", 106), ("sha256:python311", 54), ("sha256:export", 1), ("sha256:venv311", 1200)]
    second = [("sha256:base9", 110), ("sha256:python39", 50), ("sha256:export", 1), ("sha256:venv39", 1190)]
    assert bench.unique_layer_bytes(first, second) == (2711, 2712)
    assert bench.unique_layer_bytes(first, first) == (1361, 2722)


def _record(tag: str, upstream: int, files: dict[str, int], wall: float) -> dict[str, object]:
    return {"tag": tag, "upstream_bytes": upstream, "cached_bytes": 0, "fetched_files": files, "seconds": wall - 1,
            "wall_s": wall, "image_id": "sha256:0"}


def test_the_sibling_rows_carry_the_list_the_ratios_and_the_verdict() -> None:
    pair = {"first": _record("bench/tensorflow:2.18.0-cpu-py3.11-runtime-debian12", 251_000_000, FIRST, 300.0),
            "second": _record("bench/tensorflow:2.18.0-cpu-py3.9-runtime-debian11", 250_000_000, SECOND, 240.0)}
    fetched, took, registry = bench.sibling_rows(pair, (2_700_000_000, 2_800_000_000))
    assert fetched.met is True and fetched.ratio is not None and round(fetched.ratio, 3) == 0.996
    assert "numpy-2.0.2-cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64.whl (19.5 MB)" in fetched.note
    assert "The same file again (the cache missed): none." in fetched.note
    assert "importlib_metadata-8.5.0-py3-none-any.whl (26 kB)" in fetched.note
    assert took.figure == 240.0 and took.baseline == 300.0 and took.met is None
    assert registry.ratio is not None and round(registry.ratio, 3) == 0.964
    table = bench.markdown([fetched], "# Bench")
    assert ("| Python-only sibling, bytes fetched | 250 MB | 251 MB | 1.00 | only cp-tagged wheels again | yes |"
            in table)

    pair["second"]["fetched_files"] = {**SECOND, "keras-3.7.0-py3-none-any.whl": 1_228_420}
    fetched = bench.sibling_rows(pair, None)[0]
    assert fetched.met is False
    assert "The same file again (the cache missed): keras-3.7.0-py3-none-any.whl (1.2 MB)" in fetched.note
    pair["second"]["fetched_files"] = {**SECOND, "keras-3.6.0-py3-none-any.whl": 1_200_000}
    fetched = bench.sibling_rows(pair, None)[0]
    assert fetched.met is False
    assert "keras-3.6.0-py3-none-any.whl (the first: keras-3.7.0-py3-none-any.whl) (1.2 MB)" in fetched.note
    assert bench.sibling_rows(pair, None)[2].how == "not measured"


def test_without_a_pair_the_sibling_is_not_measured() -> None:
    (row,) = bench.sibling_rows(None, None)
    assert row.figure is None and row.met is None and row.how == "not measured"


def test_a_sibling_differs_from_its_cell_in_python_only() -> None:
    def cell(python: str, base: str, family: str, **claims: object) -> dict[str, object]:
        return {"tag": f"bench/tensorflow:2.18.0-cpu-py{python}-runtime-{base}", "cuda": "cpu",
                "claims": {"framework": "tensorflow", "version": "2.18.0", "cuda": None, "cudnn": None,
                           "flavor": "runtime", "cuda_source": "none", "index": "default", "python": python,
                           "base": {"name": base, "family": family}, **claims}}

    mine = cell("3.11", "debian12", "debian")
    candidates = [mine, cell("3.12", "ubuntu24.04", "ubuntu"), cell("3.10", "ubuntu22.04", "ubuntu"),
                  cell("3.9", "debian11", "debian"), cell("3.10", "debian12", "debian", flavor="devel")]
    found = bench.pick_sibling(mine, candidates)
    assert found is not None and found["tag"] == "bench/tensorflow:2.18.0-cpu-py3.9-runtime-debian11"
    assert bench.pick_sibling(mine, [mine, candidates[-1]]) is None


def test_the_bench_matrix_can_ask_for_the_sibling_it_lacks(tmp_path: Path) -> None:
    text = bench.bench_matrix((ROOT / "matrix.yaml").read_text())
    mine = {"cuda": "cpu", "claims": {"framework": "tensorflow", "version": "2.18.0", "flavor": "runtime"}}
    path = tmp_path / "matrix.yaml"
    path.write_text(bench.with_sibling(text, mine, "3.9"))
    cells, _ = expand(load_matrix(str(path)))
    (sibling,) = [c for c in cells if c.framework == "tensorflow" and c.version == "2.18.0" and c.python == "3.9"
                  and c.cuda is None]
    assert sibling.base.name == "debian11" and sibling.tag.startswith("bench/")


def test_rows_compare_the_ratio_or_the_figure_with_the_target() -> None:
    noop = bench.Row(name="no-op", figure=0.3, baseline=0.1, unit="s", target="<= 1.0", limit=1.0,
                     runs="median of 3", how="measured")
    plan = bench.Row(name="plan", figure=1.7, baseline=None, unit="ms", target="< 5 ms", limit=5.0,
                     runs="median of 3", how="measured")
    unknown = bench.Row(name="sibling", figure=None, baseline=None, unit="MB", target="-", limit=None, runs="-",
                        how="not measured", note="no records")
    assert noop.ratio is not None and round(noop.ratio, 6) == 3.0 and noop.met is False
    assert plan.ratio is None and plan.met is True
    assert unknown.met is None
    table = bench.markdown([noop, plan, unknown], "# Bench")
    assert "| no-op | 0.3 s | 0.1 s | 3.00 | <= 1.0 | **no** | median of 3 | measured |" in table
    assert "| plan | 1.7 ms | - | - | < 5 ms | yes |" in table
    assert "- **sibling**: no records" in table


def test_the_naive_recipes_nvidia_cuda_base_follows_the_matrix() -> None:
    import yaml

    doc = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    assert bench.nvidia_cuda_runtime(doc, "12.1") == "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04"
    assert bench.nvidia_cuda_runtime(doc, None) is None  # a CPU cell has no nvidia/cuda base
    assert bench.nvidia_cuda_runtime(doc, "cpu") is None
    # The torch bench cell's base has a published size; each entry names its source.
    assert "nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04" in bench.NVIDIA_CUDA_PUBLISHED
    assert all(e["bytes"] > 10**9 and e["source"] for e in bench.NVIDIA_CUDA_PUBLISHED.values())


def test_the_naive_size_on_a_published_base_swaps_the_base_only() -> None:
    # 5,466 MB naive image on a 106 MB Debian base: 5,360 MB of its own layers, on the 3,380 MB CUDA base.
    assert bench.naive_on_published_base(5_466_000_000, 106_000_000, 3_379_534_165) == 8_739_534_165


def test_usage_reads_cpu_disk_and_network_from_proc() -> None:
    usage = bench.Usage()
    usage.start()
    sum(i * i for i in range(300_000))  # some CPU
    usage.stop()
    assert usage.seconds > 0 and usage.cpu_s > 0
    assert usage.disk_mb >= 0 and usage.net_mb >= 0
    assert usage.text().startswith("CPU ") and "cores busy, disk " in usage.text()


def test_a_builds_time_is_split_by_what_its_steps_do() -> None:
    steps = [[1, "FROM debian:bookworm-slim AS os", 0.0],
             [4, "RUN apt-get update  && apt-get install -y python3", 15.0],
             [8, "RUN python3 -m venv /opt/venv  && PIP_CONFIG_FILE=... pip install", 45.0],
             [11, "COPY --from=builder /opt/builder-export/ /", 10.0],
             [12, "COPY --from=builder /opt/builder-venv/ /", 25.0],
             [19, "LABEL org.builder.hash=abc", 5.0]]
    # A record from before steps kept their last-output time: an install step is named whole.
    assert bench.decomposition(steps) == (
        "OS Python (apt) 15 s (15%), install steps (fetch, install, commit) 45 s (45%), export (COPY --from=builder, "
        "copy and commit) 35 s (35%), other steps 5 s (5%)")
    # A direct build's record: each step also keeps the seconds after its last output line (the commit).
    direct = [[4, "RUN apt-get update  && apt-get install -y python3", 10.0, 2.0],
              [8, "RUN export UV_INDEX_URL=http://packages.builder.invalid/simple UV_INDEX_STRATEGY", 26.0, 12.0],
              [9, "RUN export UV_INDEX_URL=http://packages.builder.invalid/simple UV_INDEX_STRATEGY", 30.0, 14.0],
              [10, "ENV VIRTUAL_ENV=/opt/venv", 0.5, None], [11, "COPY cell.json /opt/builder/cell.json", 3.5, None]]
    assert bench.decomposition(direct) == (
        "OS Python (apt) 10 s (14%), install steps until their last output (fetch, install) 30 s (43%), "
        "install steps after it (layer commit) 26 s (37%), other steps 4 s (6%)")


def test_the_os_python_step_is_found_as_a_record_keeps_it() -> None:
    """The rendered templates' OS Python step (both forms), cut to a record's 80 characters, and the naive
    recipe's: each is the apt step; no install step is."""
    from builder.render import dockerfile

    from .golden import cell

    for direct in (True, False):
        text = dockerfile(cell("torch-2.4.1-cuda12.1-py3.11"), direct=direct).replace("\\\n", " ")
        runs = [line for line in text.splitlines() if line.startswith("RUN ")]
        apt = [line for line in runs if "python3-venv" in line]
        assert len(apt) == 1 and bench.is_apt_step(apt[0][:80]), apt
        assert not any(bench.is_apt_step(line[:80]) for line in runs if line not in apt)
        assert not bench.is_install_step(apt[0][:80])
    assert bench.is_apt_step("RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv"[:80])


def test_an_install_step_counts_whichever_installer_it_names() -> None:
    # A record keeps an instruction's first 80 characters: the venv, pip or uv is what shows.
    for text in ("RUN python3 -m venv /opt/venv  && PIP_CONFIG_FILE=/opt/builder-sources/pip.conf /opt/ve",
                 "RUN uv venv /opt/venv && uv pip install -r /opt/builder-sources/requirements.txt",
                 "RUN /opt/builder-uv/bin/uv pip install --python /opt/venv/bin/python --no-cache -r",
                 "RUN pip install --no-cache-dir -r /opt/builder-sources/requirements.txt",
                 "RUN export UV_INDEX_URL=http://packages.builder.invalid/simple UV_INDEX_STRATEGY"):  # direct
        assert bench.is_install_step(text), text
    for text in ("RUN apt-get update && apt-get install -y python3 python3-venv",
                 "COPY installer.txt /opt/builder-sources/installer.txt",
                 "RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash app"):
        assert not bench.is_install_step(text), text
    steps = [[4, "RUN apt-get update", 10.0], [8, "RUN /opt/builder-uv/bin/uv pip install --python /opt/venv", 30.0],
             [9, "COPY --from=builder /opt/builder-venv/ /", 10.0]]
    assert bench.decomposition(steps).startswith("OS Python (apt) 10 s (20%), install steps (fetch, install, commit) 30 s")


def _tree(root: Path) -> Path:
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "lib" / "pkg" / "b.py").write_text("b = 2\n")
    (root / "lib" / "pkg" / "a.py").write_text("a = 1\n" * 1000)
    (root / "bin").mkdir()
    (root / "bin" / "python").symlink_to("/usr/bin/python3")
    return root


def test_layer_tar_is_reproducible_and_its_length_is_known_before_its_bytes(tmp_path: Path) -> None:
    import io
    import os
    import tarfile

    root = _tree(tmp_path / "venv")
    size, _ = bench.layer_tar(root, "opt/venv")
    first, second = io.BytesIO(), io.BytesIO()
    written, digest = bench.layer_tar(root, "opt/venv", first)
    os.utime(root / "lib" / "pkg" / "a.py", (12345, 12345))  # a file's time does not reach the layer
    assert bench.layer_tar(root, "opt/venv", second) == (written, digest)
    assert written == size == len(first.getvalue()) and first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["opt/venv", "opt/venv/bin", "opt/venv/bin/python", "opt/venv/lib",
                                             "opt/venv/lib/pkg", "opt/venv/lib/pkg/a.py", "opt/venv/lib/pkg/b.py"]
        assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
        assert tar.getmember("opt/venv/bin/python").linkname == "/usr/bin/python3"
        assert tar.extractfile("opt/venv/lib/pkg/a.py").read() == b"a = 1\n" * 1000  # type: ignore[union-attr]


def test_docker_archive_sends_new_layers_only_and_names_the_parents(tmp_path: Path) -> None:
    import hashlib
    import io
    import json
    import tarfile

    parent = {"RootFS": {"Layers": ["sha256:" + "1" * 64, "sha256:" + "2" * 64]},
              "Config": {"Env": ["PATH=/usr/bin"], "User": ""}, "Architecture": "arm64", "Os": "linux"}
    out = io.BytesIO()
    new = bench.docker_archive(parent, [(_tree(tmp_path / "venv"), "opt/venv")], "bench-assembled/x:1", out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert tar.getnames() == ["layer0.tar", "config.json", "manifest.json"]
        layer = tar.extractfile("layer0.tar").read()  # type: ignore[union-attr]
        config = json.loads(tar.extractfile("config.json").read())  # type: ignore[union-attr]
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert new == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert config["rootfs"]["diff_ids"] == parent["RootFS"]["Layers"] + new
    assert config["config"] == parent["Config"]
    assert (config["architecture"], config["os"]) == ("arm64", "linux")  # the parent's, not this host's
    assert manifest == [{"Config": "config.json", "RepoTags": ["bench-assembled/x:1"],
                         "Layers": ["parent/sha256:" + "1" * 64 + ".tar", "parent/sha256:" + "2" * 64 + ".tar",
                                    "layer0.tar"]}]


def test_install_steps_of_a_direct_build_are_found_in_the_engine_history() -> None:
    # what api.history shows for a direct build's install RUN (with its build argument count) and the apt step
    assert bench.is_install_step("RUN |0 /bin/sh -c export UV_INDEX_URL=http://packages.builder.invalid/simple")
    assert not bench.is_install_step("RUN /bin/sh -c apt-get update  && apt-get install -y python3 python3-venv")


def test_no_op_sides_are_timed_in_turns_after_one_untimed_run_each() -> None:
    calls: list[str] = []

    def side(name: str, seconds: list[float]) -> Callable[[], float]:
        def run() -> float:
            calls.append(name)
            return seconds.pop(0)
        return run

    first = side("builder", [9.0, 1.0, 3.0, 2.0])
    second = side("naive", [9.0, 5.0, 4.0, 6.0])
    assert bench.medians_interleaved(3, first, second) == (2.0, 5.0)
    assert calls == ["builder", "naive"] * 4


def test_the_naive_build_is_timed_by_the_same_step_clock_and_commits_are_compared() -> None:
    """The naive recipe's build lines go through builder's own StepClock; both builds' layer commits (the time
    after an install step's last output line) are then taken out of the comparison."""
    from builder.build import StepClock

    clock = StepClock()
    lines = ["Step 1/3 : FROM debian:bookworm-slim", " ---> 97877d70130a",
             "Step 2/3 : RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install torch==2.4.1",
             " ---> Running in 1234", "Collecting torch==2.4.1", "Successfully installed torch-2.4.1",
             "Removing intermediate container 1234", " ---> 5678",
             "Step 3/3 : ENV PATH=/opt/venv/bin:$PATH"]
    for line in lines:
        clock.see(line)
    steps = clock.close()
    assert [s[0] for s in steps] == [1, 2, 3]
    assert steps[0][3] is None and steps[2][3] is None  # no output of their own: the builder's lines don't count
    assert steps[1][3] is not None and 0 <= steps[1][3] <= steps[1][2]
    builder = [[4, "RUN apt-get update", 10.0, 1.0], [8, "RUN export UV_INDEX_URL=x", 30.0, 18.0],
               [9, "RUN python3 -m venv /opt/venv  && export UV_INDEX_URL=x", 36.0, 19.0], [10, "ENV A=1", 4.0, None]]
    naive = [[2, "RUN apt-get update && apt-get install -y python3", 12.0, 1.0],
             [4, "RUN python3 -m venv /opt/venv && PIP_CERT=/etc/ssl/pip-ca.pem /opt/venv/bin/pip", 100.0, 36.0]]
    assert bench.commit_share(builder, naive) == ("Layer commits: builder 37 s, naive 36 s; the steps' time without "
                                                  "them: builder 43 s, naive 76 s (0.57)")
    assert "no commit split" in bench.commit_share([[8, "RUN export UV_INDEX_URL=x", 30.0]], naive)


def test_the_assembly_script_installs_cuda_only_where_the_lock_has_nvidia_wheels() -> None:
    site = "/opt/venv/lib/python3.11/site-packages"
    torch = bench.assembly_script(["nvidia-cublas-cu12==12.1.3.1"], ["torch==2.4.1"], site)
    cpu = bench.assembly_script([], ["tensorflow==2.18.0"], site)
    # whatever an earlier run left goes first, as root in the container, before the clock starts
    assert torch.startswith("rm -rf /opt/venv /opt/cuda-libs && s=$(date")
    assert "--target /opt/cuda-libs nvidia-cublas-cu12==12.1.3.1" in torch and f"ln -s /opt/cuda-libs/nvidia {site}/nvidia" in torch
    assert "cuda-libs nvidia" not in cpu and "ln -s" not in cpu and "tensorflow==2.18.0" in cpu
    # no step may fail for want of /opt/cuda-libs (uv with no package exits 2; find on a missing folder exits 1)
    assert "find /opt -path /opt/.uv-cache -prune" in cpu


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return path


def test_inflating_counts_every_members_bytes(tmp_path: Path) -> None:
    a = _wheel(tmp_path / "a.whl", {"a/big.so": b"\0" * 3_000_000, "a/x.py": b"x = 1\n"})
    b = _wheel(tmp_path / "b.whl", {"b/y.py": b"y" * 70_000})
    cpu, inflated = bench.inflate_seconds([b, a])
    assert inflated == 3_000_000 + 6 + 70_000 and cpu >= 0
    assert bench.inflate_seconds([])[1] == 0


BUILDER_STEPS = [[4, "RUN apt-get update", 10.0, 1.0], [8, "RUN export UV_INDEX_URL=x", 30.0, 18.0],
                 [9, "RUN python3 -m venv /opt/venv  && export UV_INDEX_URL=x", 36.0, 19.0], [10, "ENV A=1", 4.0, None]]
NAIVE_STEPS = [[2, "RUN apt-get update && apt-get install -y python3", 12.0, 1.0],
               [4, "RUN python3 -m venv /opt/venv && PIP_CERT=/etc/ssl/pip-ca.pem /opt/venv/bin/pip", 100.0, 36.0]]


def test_the_shared_parts_are_each_builds_lesser_commit_and_apt_step() -> None:
    assert bench.shared_parts(BUILDER_STEPS, NAIVE_STEPS) == (36.0, 10.0)
    assert bench.shared_parts(NAIVE_STEPS, BUILDER_STEPS) == (36.0, 10.0)
    # No split for one install step, or no apt step on one side: nothing to compare, never a 0 taken as a part.
    unsplit = [BUILDER_STEPS[0], [8, "RUN export UV_INDEX_URL=x", 30.0], BUILDER_STEPS[2]]
    assert bench.shared_parts(unsplit, NAIVE_STEPS) is None
    assert bench.shared_parts(BUILDER_STEPS, NAIVE_STEPS[1:]) is None


def test_only_the_locked_versions_wheels_are_inflated_one_copy_each(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _wheel(cache / "ab" / "0123-Torch-2.4.1%2Bcu121-cp311-cp311-linux_x86_64.whl", {"t.so": b"t" * 10})
    _wheel(cache / "cd" / "4567-Torch-2.4.1%2Bcu121-cp311-cp311-linux_x86_64.whl", {"t.so": b"t" * 10})
    _wheel(cache / "ef" / "89ab-typing_extensions-4.16.0-py3-none-any.whl", {"t.py": b"t"})
    _wheel(cache / "ef" / "cdef-typing_extensions-4.15.0-py3-none-any.whl", {"t.py": b"t"})  # its metadata only
    _wheel(cache / "01" / "2345-odd[name]-1.0-py3-none-any.whl", {"o.py": b"o"})
    _wheel(cache / "01" / "6789-oddXname]-1.0-py3-none-any.whl", {"o.py": b"o"})
    fetched = {"Torch-2.4.1%2Bcu121-cp311-cp311-linux_x86_64.whl": 1, "typing_extensions-4.16.0-py3-none-any.whl": 1,
               "typing_extensions-4.15.0-py3-none-any.whl": 1, "uv-0.9.0-py3-none-manylinux_2_17_x86_64.whl": 1,
               "python3_3.11.2-1_amd64.deb": 1, "odd[name]-1.0-py3-none-any.whl": 1, "missing-1.0-py3-none-any.whl": 1}
    lock = ["torch==2.4.1+cu121", "typing-extensions==4.16.0", "missing==1.0", "pip==23.0.1", "odd==1.0"]
    found, pinned = bench.locked_wheels(cache, fetched, lock)
    assert [p.name for p in found] == ["0123-Torch-2.4.1%2Bcu121-cp311-cp311-linux_x86_64.whl",
                                       "89ab-typing_extensions-4.16.0-py3-none-any.whl"] and pinned == 5


def test_the_shared_row_adds_the_inflate_spread_over_the_cores(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    _wheel(cache / "ab" / "0123-torch-2.4.1-cp311-cp311-manylinux1_x86_64.whl", {"torch/lib.so": b"t" * 500_000})
    fetched = {"torch-2.4.1-cp311-cp311-manylinux1_x86_64.whl": 1}
    monkeypatch.setattr(bench, "inflate_seconds", lambda wheels: (8.0, 2_000_000_000))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    row = bench.shared_row(cache, fetched, ["torch==2.4.1", "pip==23.0.1"], BUILDER_STEPS, NAIVE_STEPS, 100.0)
    assert row.figure == 36.0 + 10.0 + 4.0 and row.ratio == 0.5 and row.met is None
    assert "inflating 1 of the lock's 2 pins' wheels" in row.note and "to 2,000 MB" in row.note
    assert "8.0 CPU seconds, spread evenly over 2 cores 4.0 s" in row.note
    empty = bench.shared_row(tmp_path / "none", fetched, ["torch==2.4.1"], BUILDER_STEPS, NAIVE_STEPS, 100.0)
    assert empty.figure is None and "not in the package cache" in empty.note
    unsplit = [[8, "RUN export UV_INDEX_URL=x", 30.0]]
    assert "commit split" in bench.shared_row(cache, fetched, ["torch==2.4.1"], unsplit, NAIVE_STEPS, 100.0).note


def test_the_table_names_the_engine_and_its_go_release() -> None:
    """Go's sha256 uses SHA instructions from Go 1.21: the engine's build decides much of a commit's time."""
    assert bench.engine_line({"Version": "20.10.24+dfsg1", "GoVersion": "go1.19.8"}) == \
        "Docker Engine 20.10.24+dfsg1 (built with go1.19.8)"
    assert bench.engine_line({}) == "Docker Engine ? (built with Go ?)"


def test_a_run_leaves_no_work_folder_behind_even_when_it_fails(monkeypatch, tmp_path):
    """Each BENCH_FULL run fills a work folder with about 6.5 GB; kept, three runs filled the disk."""
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    seen: list[Path] = []

    def fails(select: list[str], work: Path) -> int:
        (work / "wheels").mkdir()
        (work / "wheels" / "torch.whl").write_bytes(b"x" * 1024)
        seen.append(work)
        raise RuntimeError("a build failed")

    monkeypatch.setattr(bench, "run", fails)
    with pytest.raises(RuntimeError):
        bench.main([])
    assert seen and not seen[0].exists() and list(tmp_path.iterdir()) == []
