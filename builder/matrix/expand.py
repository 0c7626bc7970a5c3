"""Expand the `images` groups into cells: axes -> combinations (minus excludes, plus includes) -> rules.

A combination that axes produced and a rule rejects is dropped and explained; one that an include
asked for (or the only one a group yields) is an error.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import re
from dataclasses import dataclass
from typing import Any

from builder import tags
from builder.errors import MatrixError
from builder.matrix import schema
from builder.matrix.model import Base, Bootstrap, Cell, Matrix, Model, Selection, Wanted, dotted, printable
from builder.matrix.rules import CUDNN_TOKEN_MAJOR, Violation


@dataclass(frozen=True, kw_only=True)
class Combo:
    framework: schema.FrameworkName
    version: str
    cuda: str
    python: str
    flavor: str
    base: str | None = None

    def __str__(self) -> str:
        text = f"{self.framework}=={self.version} {'cpu' if self.cuda == 'cpu' else 'cuda' + self.cuda}"
        text += f" py{self.python} {self.flavor}"
        return text + (f" on {self.base}" if self.base else "")


@dataclass(frozen=True, kw_only=True)
class Rejection:
    combo: Combo
    violation: Violation
    where: str  # the group or include that produced it
    tags: tuple[str, ...] = ()  # the tags it would have had, one per candidate base: what --only globs match

    def __str__(self) -> str:
        return f"{self.combo}: {self.violation}"


def _matches(exclude: schema.Combo, combo: Combo) -> bool:
    return all(
        getattr(exclude, k) is None or getattr(exclude, k) == getattr(combo, k)
        for k in ("version", "cuda", "python", "flavor", "base")
    )


def _resolve_base(matrix: Matrix, name: str, cuda: str | None) -> Base:
    spec = matrix.spec.bases[name]
    boot = Bootstrap(suite=spec.bootstrap.suite, mirror=spec.bootstrap.mirror) if spec.bootstrap else None
    if spec.nvidia_cuda is None:
        assert spec.image is not None
        family = "ubuntu" if spec.image.startswith("ubuntu") else "debian"
        return Base(name=name, image=spec.image, python=spec.python, bootstrap=boot, family=family)
    assert cuda is not None
    release = matrix.spec.cuda[cuda]
    nv = spec.nvidia_cuda
    pieces = [release.image.tag]
    if nv.cudnn and release.image.cudnn:
        pieces.append(release.image.cudnn)
    pieces += [nv.flavor, nv.os]
    return Base(
        name=name,
        image=f"nvidia/cuda:{'-'.join(pieces)}",
        python=spec.python,
        cuda=cuda,
        cudnn_major=CUDNN_TOKEN_MAJOR.get(release.image.cudnn) if nv.cudnn else None,
        flavor=nv.flavor,
        family="ubuntu" if nv.os.startswith("ubuntu") else "debian",
    )


def _python_source(matrix: Matrix, base: str, python: str) -> str | None:
    spec = matrix.spec
    if spec.bases[base].python == python:
        return "system"
    for name, src in spec.python_sources.items():
        if base in src.bases and python in src.python:
            return name
    return None


def _python_fact(matrix: Matrix, base: str, python: str) -> tuple[Any, ...]:
    """Where to add `python` to `base`: the source that has that Python (its bases), or one that serves
    that base (its Pythons), else the python_sources section, else the base's own Python."""
    sources = matrix.spec.python_sources
    for name, src in sources.items():
        if python in src.python:
            return ("python_sources", name, "bases")
    for name, src in sources.items():
        if base in src.bases:
            return ("python_sources", name, "python")
    return ("python_sources",) if sources else ("bases", base, "python")


def _base_fits(
    matrix: Matrix, name: str, combo: Combo, build: schema.BuildLine
) -> tuple[bool, str, tuple[Any, ...] | None] | None:
    """Why base `name` cannot serve this combination, and where that fact is written; None if it can.

    The flag is True when the base is merely the wrong kind (plain OS vs nvidia/cuda): such reasons
    are left out of a message when another candidate came closer.
    """
    spec = matrix.spec.bases[name]
    nv = spec.nvidia_cuda
    wheel_devel = combo.flavor == "devel" and build.cuda_source == "wheels" and build.toolkit is not None
    if (combo.flavor == "devel" and not wheel_devel) or build.cuda_source == "system":
        if nv is None:
            need = "devel" if combo.flavor == "devel" else "system CUDA"
            why = f"{name} is no nvidia/cuda image (a {need} cell needs one"
            if combo.flavor == "devel":
                why += f": {combo.framework} {combo.version}'s CUDA {combo.cuda} wheels pin no cuda-toolkit, " \
                       "whose nvcc wheel would serve on a plain base"
            return True, why + ")", None
        if nv.flavor != combo.flavor:
            return True, f"{name} is a {nv.flavor} image, the cell is {combo.flavor}", None
        if nv.os not in matrix.spec.cuda[combo.cuda].image.os:
            return False, f"nvidia/cuda publishes no {nv.os} image for CUDA {combo.cuda}", \
                ("cuda", combo.cuda, "image", "os")
        if build.cuda_source == "system" and build.cudnn:
            shipped = CUDNN_TOKEN_MAJOR.get(matrix.spec.cuda[combo.cuda].image.cudnn) if nv.cudnn else None
            if shipped != build.cudnn.split(".")[0]:
                return False, f"{name} ships cuDNN {shipped or 'none'}, the framework needs cuDNN {build.cudnn}", \
                    ("bases", name, "nvidia_cuda")
    elif nv is not None:
        kind = "devel cells whose toolkit comes from wheels" if wheel_devel else "runtime cells"
        return True, f"{name} is an nvidia/cuda image; wheel-CUDA {kind} use a plain OS base", None
    if _python_source(matrix, name, combo.python) is None:
        return False, f"{name} ships Python {spec.python} and no python_sources entry adds {combo.python}", \
            _python_fact(matrix, name, combo.python)
    return None


def _resolve(matrix: Matrix, gi: int, combo: Combo) -> Cell | Violation:
    spec = matrix.spec
    fw = spec.frameworks[combo.framework]
    fv = fw.versions[combo.version]
    vpath = ("frameworks", combo.framework, "versions", combo.version)
    build = fv.builds.get(combo.cuda)
    if build is None:
        lines = ", ".join(fv.builds)
        return Violation("cuda-line", f"{combo.framework} {combo.version} has no build for "
                         f"{'cpu' if combo.cuda == 'cpu' else 'CUDA ' + combo.cuda} (built for: {lines})",
                         matrix.where((*vpath, "builds")))
    if combo.python not in fv.python:
        return Violation("python-wheels", f"{combo.framework} {combo.version} publishes no cp"
                         f"{combo.python.replace('.', '')} wheel (wheels exist for Python {', '.join(fv.python)})",
                         matrix.where((*vpath, "python")))
    if combo.cuda == "cpu" and combo.flavor == "devel":
        return Violation("flavor-cpu", "the devel flavor adds the CUDA toolkit; a cpu cell has none",
                         matrix.where(("images", gi)))
    group = spec.images[gi]
    candidates = [combo.base] if combo.base else group.bases
    reasons: dict[str, tuple[bool, str, tuple[Any, ...] | None]] = {}
    fits = []
    for name in candidates:
        why = _base_fits(matrix, name, combo, build)
        if why is None:
            fits.append(name)
        else:
            reasons[name] = why
    # A base whose own system ships the Python beats one that needs an extra Python source.
    fits.sort(key=lambda name: _python_source(matrix, name, combo.python) != "system")
    chosen = fits[0] if fits else None
    if chosen is None:
        close = [(text, fact) for wrong_kind, text, fact in reasons.values() if not wrong_kind]
        close = close or [(text, fact) for _, text, fact in reasons.values()]
        # The fact at fault: where the closest reason is written, else the group's list of bases.
        fact = next((f for _, f in close if f is not None), None) or ("images", gi, "bases")
        return Violation("base", "no base fits: " + "; ".join(t for t, _ in close), matrix.where(fact))
    cuda = None if combo.cuda == "cpu" else combo.cuda
    release = spec.cuda[cuda] if cuda else None
    source = _python_source(matrix, chosen, combo.python)
    assert source is not None
    base = _resolve_base(matrix, chosen, cuda if spec.bases[chosen].nvidia_cuda else None)
    unverified = tuple(f"{combo.framework} {combo.version}: {u}" for u in fv.unverified)
    unverified += tuple(f"{combo.framework} {combo.version} {combo.cuda}: {u}" for u in build.unverified)
    if release and release.unverified:
        unverified += tuple(f"cuda {cuda}: {u}" for u in release.unverified)
    return Cell(
        repository=spec.repository,
        framework=combo.framework,
        version=combo.version,
        cuda=cuda,
        cudnn=build.cudnn,
        python=combo.python,
        flavor=combo.flavor,
        base=base,
        python_source=source,
        cuda_source="none" if cuda is None else build.cuda_source,
        index=spec.indexes[build.index] if build.index != "pypi" else None,
        index_name=build.index if build.index != "pypi" else None,
        requirements=_requirements(fw, combo, build, fv),
        toolchain=_toolchain(combo, build),
        models=tuple(Model(name=m.name, hub=m.hub, url=m.url, sha256=m.sha256, input=tuple(m.input), arch=m.arch)
                     for m in group.models),
        installer=spec.installer,
        driver_ga=release.driver.ga if release else None,
        driver_floor=release.driver.floor if release else None,
        unverified=unverified,
        notes=tuple(n for n in (fv.note, build.note) if n),
    )


def _requirements(
    fw: schema.FrameworkSpec, combo: Combo, build: schema.BuildLine, fv: schema.FrameworkVersion
) -> tuple[str, ...]:
    if combo.cuda == "cpu":
        package = fw.cpu_package or fw.package
    elif build.cuda_source == "wheels" and fw.cuda_extra:
        package = f"{fw.package}[{fw.cuda_extra}]"
    else:
        package = fw.package
    reqs = [f"{package}=={combo.version}"]
    reqs += [f"{name}=={v}" for name, v in fv.companions.items()]
    return tuple(reqs + list(build.pins))


# What each hub's loading code needs in the image besides the framework, and why (read from their metadata and
# source): a name the cell's requirements must pin, and the condition under which it is needed.
MODEL_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "torch": (("torchvision", "certify builds the model's torchvision architecture ('arch')"),),
    "tfhub": (
        ("tensorflow-hub", "tensorflow_hub.load is the hub's loading API"),
        ("tf-keras", "tensorflow_hub imports tf_keras when tf.keras is Keras 3 (TensorFlow 2.16 on)"),
        ("setuptools", "tensorflow_hub imports pkg_resources, which a Python 3.12+ venv lacks"),
    ),
}
MODEL_FRAMEWORK = {"torch": "torch", "tfhub": "tensorflow"}
KERAS_3 = (2, 16)  # TensorFlow's tf.keras is Keras 3 from here on, and tf.estimator is gone
HUB_WITH_TF_KERAS = (0, 16)  # tensorflow-hub requires tf-keras (which requires `tensorflow`) from here on


def _numbers(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"[0-9]+", version or "")[:3])


def _pins(cell: Cell) -> dict[str, str]:
    """The cell's requirements as normalized name -> pinned version."""
    out = {}
    for req in cell.requirements:
        name, _, version = req.partition("==")
        out[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return out


def _tfhub_problem(cell: Cell, pins: dict[str, str], cpu_package: str | None) -> str | None:
    """What makes tfhub models impossible in this cell, whatever is pinned: tensorflow-hub 0.16 on requires tf-keras,
    which requires the `tensorflow` package itself, so on a tensorflow-cpu cell pip adds a second, CUDA-built
    TensorFlow of its own choosing over it (tf-keras 2.18.0 took tensorflow 2.18.1); tensorflow-hub 0.15, the last
    without tf-keras, imports tf.estimator, which TensorFlow 2.16 removed."""
    hub = _numbers(pins.get("tensorflow-hub"))
    keras3 = _numbers(cell.version) >= KERAS_3
    cpu = cpu_package is not None and cpu_package in pins
    if cpu and keras3:
        return (f"tensorflow_hub needs tf-keras under Keras 3, and tf-keras requires the `tensorflow` package: on a "
                f"{cpu_package} cell pip would install a second, CUDA-built TensorFlow over it; list the model in a "
                f"group of {cell.framework} {cell.version}'s CUDA cells (they run on a CPU too)")
    if cpu and hub and hub >= HUB_WITH_TF_KERAS:
        return (f"tensorflow-hub {pins['tensorflow-hub']} requires tf-keras, which requires the `tensorflow` package: "
                f"on a {cpu_package} cell pip would install a second TensorFlow over it; pin tensorflow-hub 0.15.0, "
                "the last without tf-keras")
    if keras3 and hub and hub < HUB_WITH_TF_KERAS:
        return (f"tensorflow-hub {pins['tensorflow-hub']} imports tf.estimator, which {cell.framework} {cell.version} "
                "no longer has; pin tensorflow-hub 0.16.1 or later (with tf-keras)")
    return None


def _model_needs(cell: Cell, hub: str) -> list[tuple[str, str]]:
    """The packages `hub`'s models need in `cell`, with why: tf-keras only under Keras 3, setuptools from 3.12."""
    out = []
    for name, why in MODEL_NEEDS[hub]:
        if name == "tf-keras" and _numbers(cell.version) < KERAS_3:
            continue
        if name == "setuptools" and _numbers(cell.python) < (3, 12):
            continue
        out.append((name, why))
    return out


def model_problems(matrix: Matrix, gi: int, cell: Cell) -> list[str]:
    """Why `cell` cannot load the models its group lists: a model of another framework, a loading package missing
    from its requirements (named, with where to pin it), or a hub that cannot work in this kind of cell."""
    problems = []
    pins = _pins(cell)
    vpath = ("frameworks", cell.framework, "versions", cell.version)
    spec = next((fw for name, fw in matrix.spec.frameworks.items() if name == cell.framework), None)
    cpu_package = spec.cpu_package if spec is not None and cell.cuda is None else None
    for i, model in enumerate(cell.models):
        where = f"{matrix.where(('images', gi, 'models', i))}: {dotted(('images', gi, 'models', i))}"
        if MODEL_FRAMEWORK[model.hub] != cell.framework:
            problems.append(f"{where}: a {model.hub} model needs {MODEL_FRAMEWORK[model.hub]}, and this group "
                            f"builds {cell.framework}: list it in a {MODEL_FRAMEWORK[model.hub]} group")
            continue
        impossible = _tfhub_problem(cell, pins, cpu_package) if model.hub == "tfhub" else None
        if impossible:
            problems.append(f"{where}: {model.name} cannot load in {cell.tag}: {impossible}")
            continue
        for name, why in _model_needs(cell, model.hub):
            if name not in pins:
                problems.append(f"{where}: {model.name} needs {name} in {cell.framework} {cell.version}'s image "
                                f"({why}): pin it in the companions of {matrix.where(vpath)}")
    return problems


# The pieces of a CUDA toolkit's wheels that compile: nvcc (with ptxas, fatbinary, nvlink), cicc (nvvm), the
# crt headers, CCCL (thrust, cub, libcu++). The runtime headers and libcudart come with the framework's own wheels.
TOOLCHAIN_EXTRAS = ("cccl", "crt", "nvcc", "nvvm")


def _toolchain(combo: Combo, build: schema.BuildLine) -> tuple[str, ...]:
    """What a devel cell adds from wheels: the toolkit the framework pins, with its compiler extras."""
    if combo.flavor != "devel" or build.cuda_source != "wheels" or build.toolkit is None:
        return ()
    return (f"cuda-toolkit[{','.join(TOOLCHAIN_EXTRAS)}]=={build.toolkit}",)


# The most combinations the whole matrix may ask for (the default matrix makes about 200): more means a
# mistake, and expanding it would only take time.
MAX_COMBINATIONS = 20_000


def _group_combos(matrix: Matrix, gi: int, errors: list[str]) -> list[tuple[Combo, tuple[Any, ...]]]:
    """The group's combinations, each with the path in the file that asked for it."""
    group = matrix.spec.images[gi]
    fw = matrix.spec.frameworks[group.framework]
    gpath = ("images", gi)
    out: list[tuple[Combo, tuple[Any, ...]]] = []
    for i, ex in enumerate(group.exclude):
        if ex == schema.Combo():
            errors.append(f"{matrix.where((*gpath, 'exclude', i))}: {dotted((*gpath, 'exclude', i))}: an empty "
                          "exclude matches every combination; name its version, cuda, python, flavor or base")
    if group.axes:
        ax = group.axes
        made = 0
        for version in ax.version or list(fw.versions):
            fv = fw.versions[version]
            for cuda, python, flavor in itertools.product(ax.cuda or list(fv.builds), ax.python or fv.python,
                                                          ax.flavor):
                made += 1
                combo = Combo(framework=group.framework, version=version, cuda=cuda, python=python, flavor=flavor)
                if not any(_matches(ex, combo) for ex in group.exclude):
                    out.append((combo, (*gpath, "axes")))
        if made and not out and group.exclude:
            errors.append(f"{matrix.where((*gpath, 'exclude'))}: {dotted((*gpath, 'exclude'))}: removes every one "
                          f"of the {made} combinations the axes make; the group asks for nothing")
    for i, inc in enumerate(group.include):
        assert inc.version and inc.cuda and inc.python  # check_references() refused incomplete includes
        if inc in group.include[:i]:
            first = group.include.index(inc)
            errors.append(f"{matrix.where((*gpath, 'include', i))}: {dotted((*gpath, 'include', i))}: the same "
                          f"combination as include[{first}]")
            continue
        combo = Combo(framework=group.framework, version=inc.version, cuda=inc.cuda, python=inc.python,
                      flavor=inc.flavor or "runtime", base=inc.base)
        out.append((combo, (*gpath, "include", i)))
    return out


def _count(matrix: Matrix, gi: int) -> int:
    """How many combinations group `gi` makes, before any is made."""
    group = matrix.spec.images[gi]
    fw = matrix.spec.frameworks[group.framework]
    total = len(group.include)
    if group.axes:
        ax = group.axes
        for version in ax.version or list(fw.versions):
            fv = fw.versions[version]
            total += len(ax.cuda or fv.builds) * len(ax.python or fv.python) * len(ax.flavor)
    return total


def _candidate_tags(matrix: Matrix, gi: int, combo: Combo) -> tuple[str, ...]:
    """The tags a dropped combination would have had, one per base it could have been built on."""
    spec = matrix.spec
    build = spec.frameworks[combo.framework].versions[combo.version].builds.get(combo.cuda)
    cudnn = build.cudnn if build else None
    cuda = None if combo.cuda == "cpu" else combo.cuda
    bases = [combo.base] if combo.base else spec.images[gi].bases
    return tuple(
        f"{tags.cell_repository(spec.repository, combo.framework)}:"
        + tags.cell_tag(version=combo.version, cuda=cuda, cudnn=cudnn, python=combo.python, flavor=combo.flavor,
                        base=base)
        for base in bases
    )


def expand(matrix: Matrix, selection: Selection | None = None) -> tuple[list[Cell], list[Rejection]]:
    """All cells the matrix asks for (filtered by `selection`), and the combinations that were dropped.

    Raises MatrixError for combinations asked for explicitly that a rule rejects, for groups that ask
    for nothing or repeat another, and for a matrix that asks for more than MAX_COMBINATIONS.
    """
    cells: dict[str, Cell] = {}
    dropped: list[Rejection] = []
    errors: list[str] = []
    images = matrix.spec.images
    total = 0
    for gi in range(len(images)):
        total += _count(matrix, gi)
        if total > MAX_COMBINATIONS:
            path = ("images", gi)
            raise MatrixError([f"{matrix.where(path)}: {dotted(path)}: the matrix asks for more than "
                               f"{MAX_COMBINATIONS} combinations by here; split it or narrow the axes"])
    for gi in range(len(images)):
        if images[gi] in images[:gi]:
            path = ("images", gi)
            errors.append(f"{matrix.where(path)}: {dotted(path)}: the same group as images[{images.index(images[gi])}]")
            continue
        combos = _group_combos(matrix, gi, errors)
        group_cells: list[Cell] = []
        group_drops: list[tuple[Rejection, tuple[Any, ...]]] = []
        for combo, path in combos:
            result = _resolve(matrix, gi, combo)
            where = matrix.where(path)
            if isinstance(result, Cell):
                problem = tags.tag_problem(result.image_tag)
                if problem:
                    errors.append(f"{where}: {dotted(path)}: {combo}: {problem}")
                    continue
                errors += [p for p in model_problems(matrix, gi, result) if p not in errors]
                group_cells.append(result)
                continue
            rejection = Rejection(combo=combo, violation=result, where=where, tags=_candidate_tags(matrix, gi, combo))
            if "include" in path:
                errors.append(f"{where}: {dotted(path)}: impossible combination {rejection}")
            else:
                group_drops.append((rejection, path))
        if not group_cells and group_drops and len(combos) == len(group_drops):
            # A group that yields nothing asked for exactly what it got refused: report, don't hide it.
            errors += [f"{r.where}: {dotted(p)}: impossible combination {r}" for r, p in group_drops]
        dropped += [r for r, _ in group_drops]
        for cell in group_cells:
            cells.setdefault(cell.tag, cell)
    if errors:
        raise MatrixError(errors)
    if selection is not None:
        dropped = [r for r in dropped if selection.matches_fields(
            framework=r.combo.framework, version=r.combo.version, cuda=r.combo.cuda, python=r.combo.python,
            flavor=r.combo.flavor, tag=None, tags=r.tags)]
    chosen = [c for c in cells.values() if selection is None or selection.matches(c)]
    return chosen, dropped


def _distance(a: str, b: str) -> int:
    """How far apart two version-like strings are at their first differing number (3.14 is 1 from 3.13)."""
    for x, y in zip(re.findall(r"[0-9]{1,9}", a), re.findall(r"[0-9]{1,9}", b), strict=False):
        if x != y:
            return abs(int(x) - int(y))
    return 0


def _nearest(wanted: str, have: set[str]) -> str | None:
    """The value in `have` most like `wanted`: the longest shared start, then the most alike, then the nearest
    number: `3.1` -> `3.10` (what YAML makes of an unquoted 3.10), `torch==2.4.2` -> `torch==2.4.1`."""
    def score(value: str) -> tuple[int, float, int, str]:
        prefix = next((i for i, (a, b) in enumerate(zip(wanted, value, strict=False)) if a != b),
                      min(len(wanted), len(value)))
        return (-prefix, -difflib.SequenceMatcher(None, wanted, value).ratio(), _distance(wanted, value), value)

    best = min(have, key=score, default=None)
    if best is None or -score(best)[1] < 0.5:
        return None
    return best


def no_match(selection: Selection, everything: list[Cell]) -> str:
    """Why `selection` keeps none of `everything` (the matrix's cells), in one line: each value that matches
    no cell at all, with the nearest value the matrix has; else that the selectors only match apart."""
    problems: list[str] = []

    def check(flag: str, wanted: Wanted, have: set[str]) -> None:
        for value in (wanted,) if isinstance(wanted, str) else wanted or ():
            if value not in have:
                near = _nearest(value, have)
                hint = f"did you mean {printable(near)}?" if near else "the matrix has " + ", ".join(sorted(have)[:12])
                problems.append(f"{flag} {printable(value, 60)} matches no cell ({hint})")

    check("--cuda", selection.cuda, {c.cuda or "cpu" for c in everything})
    check("--python", selection.python, {c.python for c in everything})
    check("--flavor", selection.flavor, {c.flavor for c in everything})
    names = {c.framework for c in everything} | {f"{c.framework}=={c.version}" for c in everything}
    check("--framework", tuple(f"{n}=={v}" if v else n for n, v in selection.frameworks()), names)
    if selection.framework_version is not None:
        check("--framework NAME==", selection.framework_version, {c.version for c in everything})
    for glob in selection.only:
        if not any(fnmatch.fnmatchcase(c.tag, glob) for c in everything):
            near = _nearest(glob.strip("*"), {c.tag for c in everything})
            hint = f" (did you mean {near}?)" if near else ""
            problems.append(f"--only {printable(glob, 80)} matches no cell's tag{hint}")
    if problems:
        return "; ".join(problems)
    return ("no cell has all of the selectors at once; each matches some cells alone "
            "(`python -m builder matrix --explain` with the same selectors says why)")
