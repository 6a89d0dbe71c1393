"""Notebook conventions, profile agreement, and execution through the run_all.sh path (papermill)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from crossmoda_lib import config, runs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = runs.discover_notebooks(ROOT)
PROFILES = sorted((ROOT / "params").glob("*.yaml"))


def test_there_are_notebooks_and_profiles():
    assert [p.stem for p in NOTEBOOKS][:1] == ["01_preprocess"]
    assert {"demo", "smoke", "paper"} <= {p.stem for p in PROFILES}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_a_literal_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0]
    # Plain, typed values only: papermill injects after this cell, so derived values belong elsewhere.
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.AnnAssign) and node.value is not None, ast.dump(node)
        ast.literal_eval(node.value)
    assert nb.metadata.kernelspec.name == runs.KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameter_defaults_equal_the_demo_profile(path):
    declared = runs.declared_parameters(path)
    demo = config.load_profile(ROOT / "params" / "demo.yaml")
    injected = config.notebook_parameters(demo, path.stem, declared)
    assert set(injected) == set(declared), f"demo.yaml lacks {sorted(set(declared) - set(injected))}"
    for name, default in declared.items():
        value = injected[name]
        assert (list(value) if isinstance(value, tuple) else value) == default, f"{path.name}: {name} = {default!r} but demo.yaml has {value!r}"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_fits_every_notebook(profile):
    loaded = config.load_profile(profile)
    assert loaded["common"]["profile"] == profile.stem
    assert loaded["common"]["output_dir"] == f"outputs/{profile.stem}"
    for nb in NOTEBOOKS:
        declared = runs.declared_parameters(nb)
        params = config.notebook_parameters(loaded, nb.stem, declared)
        assert set(params) == set(declared), (profile.name, nb.name)


def test_profile_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    demo = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    demo["notebooks"]["01_preprocess"]["crop_szie"] = [1, 2]
    bad.write_text(yaml.safe_dump(demo))
    with pytest.raises(config.ProfileError, match=r"bad.yaml: notebooks.01_preprocess has key\(s\) \['crop_szie'\]"):
        runs.run_profile(bad)
    del demo["common"]["seed"]
    bad.write_text(yaml.safe_dump(demo))
    with pytest.raises(config.ProfileError, match="lacks"):
        config.load_profile(bad)


def _smoke_profile(tmp_path: Path, **overrides) -> Path:
    profile = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    profile["common"]["data_dir"] = str(tmp_path / "data")
    profile["common"]["output_dir"] = str(tmp_path / "outputs")
    for key, value in overrides.items():
        profile["notebooks"]["01_preprocess"][key] = value
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Every notebook executed once with the smoke profile, through the run_all.sh path."""
    tmp = tmp_path_factory.mktemp("smoke")
    manifest = runs.run_profile(_smoke_profile(tmp), progress=False)
    return tmp, manifest


@pytest.mark.notebook
def test_every_notebook_executes_with_the_smoke_profile(smoke_run):
    tmp, manifest = smoke_run
    out = tmp / "outputs"
    assert [n["notebook"] for n in manifest["notebooks"]] == [f"notebooks/{p.name}" for p in NOTEBOOKS]
    for nb in NOTEBOOKS:
        executed = nbformat.read(out / "executed" / nb.name, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert not any(o.get("output_type") == "error" for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    saved = json.loads((out / "run_manifest.json").read_text())
    assert all(n["status"] == "ok" for n in saved["notebooks"]) and saved["seed"] == 0 and saved["git_commit"]
    assert saved["versions"]["torch"].startswith("2.13.0")
    assert (tmp / "data" / "manifest.json").is_file(), "the synthetic cohort is generated on demand"


@pytest.mark.notebook
def test_smoke_01_outputs(smoke_run):
    tmp, _ = smoke_run
    stage = tmp / "outputs" / "01_preprocess"
    executed = nbformat.read(tmp / "outputs" / "executed" / "01_preprocess.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["crop_size"] == [176, 144]
    for name in ("cases.csv", "label_volumes.csv", "manifest.json", "figures/cohort.png", "figures/before_after_london.png", "figures/before_after_tilburg.png"):
        assert (stage / name).is_file(), name
    assert len(list((stage / "source").glob("*_ceT1.nii.gz"))) == 4


@pytest.mark.notebook
def test_smoke_02_03_outputs(smoke_run):
    import SimpleITK as sitk

    from crossmoda_lib import io as cio

    tmp, _ = smoke_run
    out = tmp / "outputs"
    for name in ("02_cyclegan/checkpoint.pt", "02_cyclegan/losses.csv", "02_cyclegan/manifest.json", "02_cyclegan/figures/losses.png", "02_cyclegan/figures/cycle_examples.png", "03_translate/manifest.json", "03_translate/figures/pseudo_hrT2.png"):
        assert (out / name).is_file(), name
    sources = sorted((out / "01_preprocess" / "source").glob("*_ceT1.nii.gz"))
    for folder in ("pseudo_hrT2", "pseudo_hrT2_vc"):
        for src in sources:
            case = src.name.removesuffix("_ceT1.nii.gz")
            pseudo = sitk.ReadImage(str(out / "03_translate" / folder / f"{case}_pseudoT2.nii.gz"))
            assert cio.geometry_mismatch(pseudo, sitk.ReadImage(str(src))) is None
            assert (out / "03_translate" / folder / f"{case}_Label.nii.gz").is_file()


@pytest.mark.notebook
def test_a_failing_notebook_is_named_and_stops_the_run(tmp_path):
    with pytest.raises(runs.NotebookFailed, match=r"notebooks/01_preprocess.ipynb failed .*crop_size"):
        runs.run_profile(_smoke_profile(tmp_path, crop_size=[0, 0]), progress=False)
    saved = json.loads((tmp_path / "outputs" / "run_manifest.json").read_text())
    assert saved["notebooks"][-1]["status"] == "failed"


def test_run_all_sh_rejects_an_unknown_profile():
    venv = Path(sys.prefix)
    if not (venv / ".crossmoda-installed").exists():
        pytest.skip("tests are not running in the environment run_all.sh manages")
    env = {**os.environ, "CROSSMODA_VENV": str(venv)}
    result = subprocess.run(["bash", str(ROOT / "run_all.sh"), "no_such_profile"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "no profile params/no_such_profile.yaml" in result.stderr


@pytest.mark.notebook
def test_smoke_04_05_outputs(smoke_run):
    import pandas as pd
    import SimpleITK as sitk

    from crossmoda_lib import io as cio

    tmp, _ = smoke_run
    out = tmp / "outputs"
    manifest = json.loads((out / "04_singan" / "manifest.json").read_text())
    n_scales = manifest["pyramid"]["stop_scale"] + 1
    assert sorted(p.name for p in (out / "04_singan").glob("scale_*.pt")) == [f"scale_{n:02d}.pt" for n in range(n_scales)]
    assert manifest["training_case"].startswith("crossmoda2021_ldn_") and (out / "04_singan" / "figures" / "samples.png").is_file()
    table = pd.read_csv(out / "05_blending" / "augmentations.csv")
    assert list(table.columns[:9]) == ["case", "centre", "rule", "structure", "lambda", "start_scale", "seed", "volume_mm3", "std"]
    assert set(table.rule) >= {"vs_small", "cochlea"} and (out / "05_blending" / "figures" / "figure3.png").is_file()
    # Every cochlea is augmented with lambda 2, 3, 4; every file exists with its label and geometry.
    assert (table[table.structure == "cochlea"].groupby("case")["lambda"].apply(sorted).map(tuple) == (2.0, 3.0, 4.0)).all()
    for row in table.itertuples():
        volume = sitk.ReadImage(str(out / "05_blending" / row.file))
        label = sitk.ReadImage(str(out / "05_blending" / row.file.replace("_pseudoT2", "_Label")))
        source = sitk.ReadImage(str(out / "03_translate" / row.source / f"{row.case}_pseudoT2.nii.gz"))
        assert cio.geometry_mismatch(volume, source) is None and cio.geometry_mismatch(label, source) is None
