"""Headless execution of the notebooks with papermill (what ``run_all.sh`` calls).

Every notebook ``notebooks/NN_*.ipynb`` that exists is executed in order with the parameters of one
profile, with the ``python3`` kernel of the running environment and ``notebooks/`` as working
directory (as in JupyterLab). Executed copies go to ``outputs/<profile>/executed/``. The first
failing notebook stops the run, is named in the error, and its executed copy shows the failing cell.
``outputs/<profile>/run_manifest.json`` records parameters, versions, the seed, each notebook's wall
time and the git commit.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from crossmoda_lib import config, devices
from crossmoda_lib import io as cio

KERNEL_NAME = "python3"


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names it and where its executed copy is."""


def discover_notebooks(root: Path | None = None) -> list[Path]:
    """The stage notebooks (``notebooks/NN_*.ipynb``) in order."""
    root = root or config.project_root()
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def declared_parameters(notebook: Path) -> dict:
    """Names and default values of a notebook's ``parameters`` cell (as papermill reads them)."""
    import papermill

    found = papermill.inspect_notebook(str(notebook))
    return {name: _literal(info["default"]) for name, info in found.items()}


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_profile(profile_path: Path | str, notebooks: list[str] | None = None, *, progress: bool = True, kernel_name: str = KERNEL_NAME) -> dict:
    """Execute the notebooks with one profile.

    Args:
        profile_path: a ``params/*.yaml`` file.
        notebooks: notebook stems to run (default: all that exist).
        progress: papermill's per-cell progress bar.
        kernel_name: the Jupyter kernel.

    Returns:
        The run manifest.

    Raises:
        ProfileError: bad profile (before anything runs).
        DataError: the data folder is unusable (before anything runs).
        FolderLocked: another run works in the output folder (it is named).
        NotebookFailed: a notebook failed (later notebooks are not run).
    """
    import papermill

    root = config.project_root()
    profile = config.load_profile(profile_path)
    common = profile["common"]
    every = discover_notebooks(root)
    # Parameters of every notebook: an --only run may reuse stages it does not run, checked as a full run checks them.
    full_plan = [(nb, config.notebook_parameters(profile, nb.stem, declared_parameters(nb))) for nb in every]
    plan = full_plan
    if notebooks:
        by_stem = {nb.stem: (nb, params) for nb, params in full_plan}
        missing = [n for n in notebooks if n not in by_stem]
        if missing:
            raise config.ProfileError(f"no notebook(s) {missing} in {root / 'notebooks'}")
        plan = [by_stem[n] for n in notebooks]
    unknown_sections = sorted(set(profile["notebooks"]) - {p.stem for p in every})
    if unknown_sections:
        raise config.ProfileError(f"{profile_path}: notebooks section(s) {unknown_sections} match no notebook")
    device = devices.resolve(common["device"])  # a GPU that is not there fails here, before any work
    kernel_env, kernel_note = devices.cpu_kernel_environment(common["cpu_kernels"])
    if kernel_note:
        print(kernel_note)
    out_root = config.resolve_path(common["output_dir"], root)
    # One run at a time in an output folder (a second is refused, naming the first), and what a
    # killed run left half-written there is cleared before anything reads the folder.
    with cio.folder_lock(out_root, f"crossmoda run {profile_path}"):
        cio.remove_partials(out_root)
        data_dir = config.prepare_data(common["data_source"], common["data_dir"], common["seed"], common["synth_cases_per_centre"], common["synth_fov"], common["synth_test_cases_per_centre"])
        report = cio.validate_dataset(data_dir)
        report.raise_if_errors()
        executed = out_root / "executed"
        executed.mkdir(parents=True, exist_ok=True)
        manifest = {
            "profile": common["profile"],
            "profile_file": str(profile_path),
            "parameters": {"common": common, "notebooks": profile["notebooks"]},
            "seed": common["seed"],
            "data_dir": str(data_dir),
            "versions": config.versions(),
            "machine": {**config.machine(), **kernel_env, **devices.describe(device)},
            "git_commit": config.git_commit(root),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "notebooks": [],
        }
        # The notebooks run the pinned kernels, whatever this process computes with.
        manifest["machine"]["cpu_kernels"] = kernels_label(common["cpu_kernels"])
        if kernel_env:
            manifest["machine"]["torch_cpu_capability"] = kernel_env["ATEN_CPU_CAPABILITY"].upper()
        manifest_path = out_root / "run_manifest.json"
        earlier = _earlier_entries(manifest_path, common["profile"], {nb.name for nb, _ in plan})
        reused = _reuse_stages(profile, full_plan, out_root, root)
        manifest["reused"] = reused
        plan = [(nb, params) for nb, params in plan if nb.stem not in reused]

        def save() -> None:
            entries = sorted(earlier + manifest["notebooks"], key=lambda e: e["notebook"])
            cio.write_text_atomic(manifest_path, json.dumps({**manifest, "notebooks": entries}, indent=2, default=str) + "\n")

        for nb, params in plan:
            target = executed / nb.name
            t0 = time.perf_counter()
            entry = {"notebook": f"notebooks/{nb.name}", "executed": str(target), "parameters": params}
            try:
                with devices.pinned_cpu_kernels(common["cpu_kernels"]):  # the kernel and its workers inherit them
                    papermill.execute_notebook(str(nb), str(target), parameters=params, kernel_name=kernel_name, cwd=str(nb.parent), progress_bar=progress)
            except papermill.PapermillExecutionError as exc:
                entry.update(status="failed", wall_s=round(time.perf_counter() - t0, 2), error=f"{exc.ename}: {exc.evalue}")
                manifest["notebooks"].append(entry)
                save()
                raise NotebookFailed(f"notebooks/{nb.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n  executed copy: {target}") from exc
            entry.update(status="ok", wall_s=round(time.perf_counter() - t0, 2))
            manifest["notebooks"].append(entry)
            save()
        manifest["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        save()
        return manifest


#: Output folder of each notebook (the stage folder a later run may reuse).
STAGE_FOLDERS = {"05_tumor_blending": "05_blending"}
PATH_KEYS = ("profile", "output_dir", "data_dir")
#: Keys that do not make two runs of a notebook different settings: paths, and where the networks
#: ran (another device rounds differently, as another thread count does; the run manifest records it).
UNCOMPARED_KEYS = (*PATH_KEYS, "device")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (no extra space), copying it where links are impossible (another device)."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time in ns) of every file under ``folder``, by relative path. Hard links
    and ``copy2`` keep both; any rewrite (atomic writes make new files) changes the time."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def stale_reuse(run_dir: Path | str) -> dict[str, str]:
    """Stages that the run in ``run_dir`` reused (``reuse:``) and whose source has been rewritten
    since, ``{notebook: why}``; empty when none (or nothing was reused). An ablation whose stages
    01-05 came from an earlier run of the demo compares two different CycleGAN draws, not one change."""
    run_dir = Path(run_dir)
    manifest = run_dir / "run_manifest.json"
    if not manifest.is_file():
        return {}
    stale = {}
    for stem, source in json.loads(manifest.read_text()).get("reused", {}).items():
        folder = STAGE_FOLDERS.get(stem, stem)
        source = Path(source)
        if not source.is_dir():
            stale[stem] = f"{source} no longer exists"
            continue
        mine, theirs = _fingerprint(run_dir / folder), _fingerprint(source)
        changed = [name for name, stamp in mine.items() if theirs.get(name) != stamp]
        if changed:
            stale[stem] = f"{len(changed)} of its {len(mine)} files were rewritten in {source} since (e.g. {changed[0]})"
    return stale


def _differing_keys(mine: dict, theirs: dict) -> list[str]:
    """Parameter names whose values differ between two runs of a notebook (paths and device aside:
    ``UNCOMPARED_KEYS``; a key only one of them has differs)."""
    mine = {k: v for k, v in mine.items() if k not in UNCOMPARED_KEYS}
    theirs = {k: v for k, v in theirs.items() if k not in UNCOMPARED_KEYS}
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def outdated_parameters(run_dir: Path | str, ignore: tuple[str, ...] = ("09_evaluation",)) -> dict[str, list[str]]:
    """Notebooks that the run in ``run_dir`` executed with parameters its profile file no longer
    gives, ``{notebook: [keys]}`` (paths aside; a key the run did not have counts as changed);
    empty when none, or when the run or its profile file is gone. An ablation run before a change
    of the demo profile that it extends compares two changes, not one. ``ignore``: notebooks whose
    settings do not change the run's predictions (its own evaluation)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "run_manifest.json"
    if not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text())
    profile_file = config.resolve_path(manifest.get("profile_file", ""), config.project_root()) if manifest.get("profile_file") else None
    if profile_file is None or not profile_file.is_file():
        return {}
    profile = config.load_profile(profile_file)
    by_stem = {nb.stem: nb for nb in discover_notebooks()}
    outdated = {}
    for entry in manifest.get("notebooks", []):
        stem = Path(entry["notebook"]).stem
        if entry.get("status") != "ok" or stem not in by_stem or stem in ignore:
            continue
        keys = _differing_keys(config.notebook_parameters(profile, stem, declared_parameters(by_stem[stem])), entry["parameters"])
        if keys:
            outdated[stem] = keys
    return outdated


def _earlier_entries(manifest_path: Path, profile: str, now: set[str]) -> list[dict]:
    """Entries of notebooks run earlier with the same profile and not re-run now (``--only`` runs
    then extend the run's manifest instead of replacing it)."""
    if not manifest_path.is_file():
        return []
    old = json.loads(manifest_path.read_text())
    if old.get("profile") != profile:
        return []
    return [e for e in old.get("notebooks", []) if Path(e["notebook"]).name not in now]


def kernels_label(choice: str) -> str:
    """What a run manifest records as ``machine.cpu_kernels`` for a profile's ``cpu_kernels``: the
    kernels the notebooks run (``native`` where ``avx2`` cannot be pinned, the CPU lacking it)."""
    return choice if devices.cpu_kernel_environment(choice)[0] else "native"


def _reuse_stages(profile: dict, plan: list, out_root: Path, root: Path) -> dict[str, str]:
    """Copy finished stages from another run instead of recomputing them (ablations share 01-05).

    A profile's ``reuse: {from: outputs/demo, notebooks: [01_preprocess, ...]}`` is honoured only when
    that run executed each notebook successfully with the same parameters (paths aside); otherwise a
    :class:`ProfileError` says which notebook differs. Files are hard-linked when possible.
    """
    import shutil

    spec = profile.get("reuse")
    if not spec:
        return {}
    source = config.resolve_path(spec["from"], root)
    manifest_path = source / "run_manifest.json"
    if not manifest_path.is_file():
        raise config.ProfileError(f"{profile['path']}: reuse.from {source} has no run_manifest.json; run that profile first")
    source_manifest = json.loads(manifest_path.read_text())
    # Stages computed with other CPU kernels are another draw (devices.cpu_kernel_environment).
    machine = source_manifest.get("machine", {})
    # (a run made before the setting existed: the variable it ran with, if any)
    theirs = machine.get("cpu_kernels") or ("avx2" if machine.get("ATEN_CPU_CAPABILITY") == "avx2" else "native")
    ours = kernels_label(profile["common"]["cpu_kernels"])
    if theirs != ours:
        raise config.ProfileError(
            f"{profile['path']}: reuse.from {source} ran with cpu_kernels {theirs}, this profile with {ours}: its stages would be another draw; re-run that profile, or set common.cpu_kernels to match"
        )
    done = {Path(e["notebook"]).stem: e for e in source_manifest["notebooks"] if e["status"] == "ok"}
    wanted = {nb.stem: params for nb, params in plan}
    reused = {}
    for stem in spec.get("notebooks", []):
        if stem not in done:
            raise config.ProfileError(f"{profile['path']}: reuse: {source} has no successful run of {stem}")
        diff = _differing_keys(wanted.get(stem, {}), done[stem]["parameters"])
        if diff:
            raise config.ProfileError(f"{profile['path']}: reuse of {stem} from {source}: parameters differ ({diff})")
        folder = STAGE_FOLDERS.get(stem, stem)
        target = out_root / folder
        # A folder left there by an earlier run (the source re-run since, or another source) is replaced:
        # the stage must be the source's, file for file.
        if not target.exists() or _fingerprint(target) != _fingerprint(source / folder):
            tmp, old = out_root / f".{folder}.reusing", out_root / f".{folder}.replaced"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(source / folder, tmp, copy_function=_link_or_copy)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        reused[stem] = str(source / folder)
    return reused
