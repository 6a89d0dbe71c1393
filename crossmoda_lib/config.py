"""Profiles (``params/*.yaml``), project paths and version records.

A profile file may start from another (``extends: demo.yaml``, relative to the file; its sections
are merged key by key) and may reuse finished stages of another run (``reuse``, see
:func:`crossmoda_lib.runs.run_profile`). A profile file has a ``common`` section (profile name, seed, data and output folders, synthetic
cohort settings) and a ``notebooks`` section with one mapping per notebook stem. Each notebook gets
the common values it declares in its ``parameters`` cell plus its own section; a key in a section
that the notebook does not declare is an error (a typo would otherwise be silently ignored).

Relative paths in a profile are relative to the project root (the folder holding ``pyproject.toml``
and ``crossmoda_lib/``), whatever the working directory, so the same profile works from
``run_all.sh``, from JupyterLab (whose working directory is ``notebooks/``) and from tests.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from crossmoda_lib import io as cio

COMMON_KEYS = ("profile", "seed", "data_source", "data_dir", "output_dir", "synth_cases_per_centre", "synth_fov")
#: Common keys a profile may leave out, with their defaults (``device``, ``cpu_kernels``:
#: :mod:`crossmoda_lib.devices`).
OPTIONAL_COMMON = {"device": "auto", "cpu_kernels": "native", "synth_test_cases_per_centre": 0}
DATA_SOURCES = ("synthetic", "real")


class ProfileError(ValueError):
    """A profile file is malformed; the message names the file and the key."""


def project_root(start: Path | str | None = None) -> Path:
    """The project root: the first folder upwards from ``start`` (default: the working directory)
    holding both ``pyproject.toml`` and ``crossmoda_lib/``; else the folder above this package."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "crossmoda_lib").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def resolve_path(path: Path | str, root: Path | None = None) -> Path:
    """An absolute path: ``path`` itself if absolute, else relative to the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p


def load_profile(path: Path | str) -> dict[str, Any]:
    """Read and check a profile file.

    Raises:
        ProfileError: missing file, bad YAML, missing or unknown common keys, bad values.
    """
    path = Path(path)
    data = _resolve_extends(path, [])
    if not isinstance(data, dict) or not isinstance(data.get("common"), dict):
        raise ProfileError(f"{path}: expected a mapping with a 'common' section")
    common = data["common"]
    missing = [k for k in COMMON_KEYS if k not in common]
    if missing:
        raise ProfileError(f"{path}: common section lacks {missing}")
    unknown = [k for k in common if k not in COMMON_KEYS and k not in OPTIONAL_COMMON]
    if unknown:
        raise ProfileError(f"{path}: unknown common key(s) {unknown}; known: {[*COMMON_KEYS, *OPTIONAL_COMMON]}")
    if common["data_source"] not in DATA_SOURCES:
        raise ProfileError(f"{path}: common.data_source must be one of {DATA_SOURCES}, not {common['data_source']!r}")
    common = {**OPTIONAL_COMMON, **common}
    from crossmoda_lib import devices, schema

    problems = schema.check_common(common)
    if problems:
        raise ProfileError(f"{path}: " + "; ".join(problems))

    try:
        devices.parse(common["device"])
    except devices.DeviceError as exc:
        raise ProfileError(f"{path}: common.device: {exc}") from exc
    if common["cpu_kernels"] not in devices.CPU_KERNEL_CHOICES:
        raise ProfileError(f"{path}: common.cpu_kernels must be one of {devices.CPU_KERNEL_CHOICES}, not {common['cpu_kernels']!r}")
    notebooks = data.get("notebooks") or {}  # every section a mapping: _checked_sections
    extra = sorted(set(data) - {"common", "notebooks", "reuse"})
    if extra:
        raise ProfileError(f"{path}: unknown top-level key(s) {extra}; known: common, notebooks, extends, reuse")
    reuse = data.get("reuse")
    if reuse is not None and (not isinstance(reuse, dict) or "from" not in reuse or not isinstance(reuse.get("notebooks"), list)):
        raise ProfileError(f"{path}: reuse must be a mapping with 'from' (an output folder) and 'notebooks' (a list)")
    return {"path": str(path), "common": common, "notebooks": {k: dict(v) for k, v in notebooks.items()}, "reuse": reuse}


def _resolve_extends(path: Path, chain: list[Path]) -> Any:
    """A profile file with the files it extends merged in, at any depth (each ``extends`` is
    relative to the file that names it); a loop is refused, naming the files in it."""
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in [*chain[chain.index(here):], here])
        raise ProfileError(f"{chain[0]}: 'extends' loops: {loop}")
    data = _checked_sections(path, _read_yaml(path))
    if not isinstance(data, dict) or "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ProfileError(f"{path}: extends must name a profile file, not {parent!r}")
    base = _resolve_extends(path.parent / parent, [*chain, here])
    if not isinstance(base, dict):
        raise ProfileError(f"{path.parent / parent}: expected a mapping (extended by {path})")
    merged = {**base, **{k: v for k, v in data.items() if k not in ("common", "notebooks")}}
    merged["common"] = {**(base.get("common") or {}), **(data.get("common") or {})}
    notebooks = {k: dict(v) for k, v in (base.get("notebooks") or {}).items()}
    for name, section in (data.get("notebooks") or {}).items():
        notebooks[name] = {**notebooks.get(name, {}), **section}
    merged["notebooks"] = notebooks
    return merged


def merged_profile(path: Path | str) -> dict[str, Any]:
    """A profile file as one mapping, its ``extends`` chain merged in (no key checked): what a test
    or a script copies elsewhere and edits, since a relative ``extends`` would not follow it."""
    data = _resolve_extends(Path(path), [])
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with a 'common' section")
    return data


def profile_file(name: Path | str) -> Path:
    """A profile named on a command line: a path, or a name under ``params/`` (``demo``, ``ablations/no_tba``)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = project_root() / "params" / (str(name) if str(name).endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    raise ProfileError(f"{name}: profile file not found (a path, or a name in {project_root() / 'params'})")


def profile_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """Every setting two loaded profiles give differently, as (section, key, value in a, value in b);
    ``section`` is ``common`` or a notebook name; a key one of them lacks has ``None`` there."""
    rows = []
    sections = [("common", a["common"], b["common"])]
    for name in sorted({*a["notebooks"], *b["notebooks"]}):
        sections.append((name, a["notebooks"].get(name, {}), b["notebooks"].get(name, {})))
    for name, left, right in sections:
        for key in [*left, *(k for k in right if k not in left)]:
            if left.get(key) != right.get(key):
                rows.append((name, key, left.get(key), right.get(key)))
    return rows


def _checked_sections(path: Path, data: Any) -> Any:
    """One profile file's ``common`` and ``notebooks`` checked to be mappings (each notebook's
    section too; an empty one means no changes), before it is merged with the file it extends."""
    if not isinstance(data, dict):
        return data  # load_profile names the problem
    if data.get("common") is not None and not isinstance(data["common"], dict):
        raise ProfileError(f"{path}: 'common' must be a mapping, not {data['common']!r}")
    notebooks = data.get("notebooks")
    if notebooks is None:
        return data
    if not isinstance(notebooks, dict):
        raise ProfileError(f"{path}: 'notebooks' must map notebook names to mappings")
    for name, section in notebooks.items():
        if section is not None and not isinstance(section, dict):
            raise ProfileError(f"{path}: notebooks.{name} must be a mapping of keys to values, not {section!r}")
    data["notebooks"] = {name: section or {} for name, section in notebooks.items()}
    return data


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({exc})") from exc


def notebook_parameters(profile: dict[str, Any], notebook: str, declared: dict[str, Any]) -> dict[str, Any]:
    """Parameters to inject into one notebook.

    Args:
        profile: from :func:`load_profile`.
        notebook: the notebook's stem, e.g. ``01_preprocess``.
        declared: the notebook's parameters (names to defaults), e.g. from papermill's
            ``inspect_notebook``.

    Raises:
        ProfileError: the profile's section for this notebook has a key the notebook does not declare,
            or a value of another type or out of range (:mod:`crossmoda_lib.schema`).
    """
    section = profile["notebooks"].get(notebook, {})
    unknown = sorted(set(section) - set(declared))
    if unknown:
        raise ProfileError(f"{profile['path']}: notebooks.{notebook} has key(s) {unknown} that notebooks/{notebook}.ipynb does not declare")
    from crossmoda_lib import schema

    problems = schema.check_notebook(notebook, section, declared)
    if problems:
        raise ProfileError(f"{profile['path']}: " + "; ".join(problems))
    params = {k: v for k, v in profile["common"].items() if k in declared}
    params.update(section)
    return params


def prepare_data(data_source: str, data_dir: Path | str, seed: int, synth_cases_per_centre: int, synth_fov: str, synth_test_cases_per_centre: int = 0) -> Path:
    """Make sure the data folder holds data: generate the synthetic cohort into it when it is missing
    or empty (``data_source: synthetic``); for real data, check that it exists.

    Returns:
        The absolute data folder.

    Raises:
        DataError: real data missing or empty (the message says how to point the profile at it).
    """
    from crossmoda_lib import synth

    path = resolve_path(data_dir)
    if data_source == "synthetic":
        # Two runs that share a data folder (other output folders) generate it once: the second waits.
        with cio.folder_lock(path.parent, f"generating {path}", name=f".{path.name}.lock", wait=True):
            synth.ensure_cohort(path, seed=seed, cases_per_centre=synth_cases_per_centre, fov=synth_fov, test_cases_per_centre=synth_test_cases_per_centre)
    elif not path.is_dir() or not any(path.iterdir()):
        raise cio.DataError(
            f"{path}: real data folder is missing or empty. Download the crossMoDA 2022 data and set "
            "common.data_dir in the profile to the folder holding training_source/, training_target/ "
            "and validation/ (or set common.data_source: synthetic)."
        )
    return path


def require_stage(stage: Path | str, name: str) -> Path:
    """Fail early, naming the notebook to run, when an earlier stage's outputs are missing."""
    stage = Path(stage)
    if not (stage / "manifest.json").is_file():
        raise cio.DataError(f"{stage}: no finished {name} outputs (manifest.json missing); run notebooks/{name}.ipynb first")
    return stage


def stage_dir(output_dir: Path | str, stage: str) -> Path:
    """The folder of one stage's outputs, e.g. ``outputs/demo/01_preprocess``."""
    return resolve_path(output_dir) / stage


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that matter for results."""
    out = {"python": platform.python_version()}
    for dist in ("crossmoda-companion", "torch", "monai", "SimpleITK", "numpy", "scipy", "papermill"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict:
    """What the numbers of a run depend on besides code, parameters and seed: the CPU model, the
    threads torch uses, and the CPU kernel family (torch's capability, and the ``ATEN_CPU_CAPABILITY``
    and ``ONEDNN_MAX_CPU_ISA`` variables that override it when set; docs/experiments.md). The
    same seed gives the same numbers only on machines that agree on all of them."""
    import os

    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return {
        "cpu": model,
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{key: os.environ.get(key, "") for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
    }


def git_commit(root: Path | None = None) -> str:
    """The project's git commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    root = root or project_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
