"""Notebook conventions, profile agreement, and execution through the run_all.sh path (papermill)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from crossmoda_lib import config, devices, runs, selftraining
from crossmoda_lib import io as cio

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = runs.discover_notebooks(ROOT)
PROFILES = sorted((ROOT / "params").glob("*.yaml")) + sorted((ROOT / "params" / "ablations").glob("*.yaml"))


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
    demo = config.merged_profile(ROOT / "params" / "demo.yaml")
    demo["notebooks"]["01_preprocess"]["crop_szie"] = [1, 2]
    bad.write_text(yaml.safe_dump(demo))
    with pytest.raises(config.ProfileError, match=r"bad.yaml: notebooks.01_preprocess has key\(s\) \['crop_szie'\]"):
        runs.run_profile(bad)
    del demo["common"]["seed"]
    bad.write_text(yaml.safe_dump(demo))
    with pytest.raises(config.ProfileError, match="lacks"):
        config.load_profile(bad)


def _smoke_profile(tmp_path: Path, **overrides) -> Path:
    profile = config.merged_profile(ROOT / "params" / "smoke.yaml")
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
    # The numbers depend on the CPU's kernels and the thread count (README): the manifest says which.
    import os

    import torch

    assert saved["machine"]["cores"] == os.cpu_count() and saved["machine"]["torch_threads"] == torch.get_num_threads()
    # The smoke profile pins the AVX2 kernels (common.cpu_kernels) where the CPU has them: the
    # notebooks' kernels run them, whatever this process runs, and the manifest says so.
    kernels = "AVX2" if devices.cpu_has_avx2() else torch.backends.cpu.get_cpu_capability()
    assert saved["machine"]["torch_cpu_capability"] == kernels and saved["machine"]["cpu"]
    assert saved["machine"]["cpu_kernels"] == ("avx2" if devices.cpu_has_avx2() else "native")
    for name in ("02_cyclegan", "06_segmentation"):
        printed = "".join(o.get("text", "") for c in nbformat.read(out / "executed" / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code" for o in c.outputs)
        assert f"CPU kernels {kernels}" in printed, name
    # ... and the device the networks ran on (the smoke profile's "auto": the first GPU, else the CPU).
    assert saved["machine"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert saved["parameters"]["common"]["device"] == "auto"
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
    # The held-out test split (one hrT2 per centre in the smoke profile), each with its truth.
    tests = sorted(p.name for p in (stage / "test").glob("*_hrT2.nii.gz"))
    assert tests == ["crossmoda2021_ldn_311_hrT2.nii.gz", "crossmoda2022_etz_310_hrT2.nii.gz"]
    assert all((stage / "synthetic_truth" / t.replace("_hrT2", "_hrT2_Label")).is_file() for t in tests)


@pytest.mark.notebook
def test_smoke_02_03_outputs(smoke_run):
    import SimpleITK as sitk

    from crossmoda_lib import io as cio

    tmp, _ = smoke_run
    out = tmp / "outputs"
    for name in (
        "02_cyclegan/checkpoint.pt",
        "02_cyclegan/losses.csv",
        "02_cyclegan/manifest.json",
        "02_cyclegan/figures/losses.png",
        "02_cyclegan/figures/cycle_examples.png",
        "03_translate/manifest.json",
        "03_translate/figures/pseudo_hrT2.png",
    ):
        assert (out / name).is_file(), name
    # The draw gate (smoke: 2 draws): both screened, the chosen one is the stage's CycleGAN.
    draws = pd.read_csv(out / "02_cyclegan" / "draws.csv")
    assert list(draws.draw) == [0, 1] and draws.chosen.sum() == 1
    chosen = int(draws.loc[draws.chosen, "draw"].iloc[0])
    assert (out / "02_cyclegan" / "checkpoint.pt").read_bytes() == (out / "02_cyclegan" / "draws" / f"draw_{chosen}" / "checkpoint.pt").read_bytes()
    sources = sorted((out / "01_preprocess" / "source").glob("*_ceT1.nii.gz"))
    for folder in ("pseudo_hrT2", "pseudo_hrT2_vc"):
        for src in sources:
            case = src.name.removesuffix("_ceT1.nii.gz")
            pseudo = sitk.ReadImage(str(out / "03_translate" / folder / f"{case}_pseudoT2.nii.gz"))
            assert cio.geometry_mismatch(pseudo, sitk.ReadImage(str(src))) is None
            assert (out / "03_translate" / folder / f"{case}_Label.nii.gz").is_file()


@pytest.mark.notebook
def test_a_failing_notebook_is_named_and_stops_the_run(tmp_path):
    # Each percentile is in range (the profile schema passes it); their order is the notebook's to refuse.
    with pytest.raises(runs.NotebookFailed, match=r"notebooks/01_preprocess.ipynb failed .*intensity_percentiles"):
        runs.run_profile(_smoke_profile(tmp_path, intensity_percentiles=[99.9, 0.5]), progress=False)
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
    # Section 4: one level row per augmentation, the structure brighter after lambda >= 2.
    levels = pd.read_csv(out / "05_blending" / "structure_levels.csv")
    assert list(levels[["case", "structure", "lambda", "start_scale"]].itertuples(index=False, name=None)) == list(
        table[["case", "structure", "lambda", "start_scale"]].itertuples(index=False, name=None)
    )
    cochlea = levels[levels.structure == "cochlea"]
    assert (cochlea.level_after > cochlea.level_before).all()


@pytest.mark.notebook
def test_smoke_06_07_08_outputs(smoke_run):
    import SimpleITK as sitk

    from crossmoda_lib import inference
    from crossmoda_lib import io as cio

    tmp, _ = smoke_run
    out, data = tmp / "outputs", tmp / "data"
    for structure in ("vs", "cochlea"):
        assert (out / "06_segmentation" / structure / "fold_0" / "history.csv").is_file()
    # The 06 figure shows each case at its largest true VS, so that a missed tumour is in view.
    from crossmoda_lib import segmentation

    rows = segmentation.prediction_rows(out / "01_preprocess", out / "06_segmentation")
    assert len(rows) == 2
    for title, _, _, truth_slice in rows:
        case = title.split()[-1]
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "01_preprocess" / "synthetic_truth" / f"{case}_hrT2_Label.nii.gz")))
        assert (truth_slice == 1).sum() == (truth == 1).sum(axis=(1, 2)).max() > 0
    smoke = config.merged_profile(ROOT / "params" / "smoke.yaml")["notebooks"]["07_self_training"]
    rounds = smoke["rounds"] + 1  # the rounds, then the final model
    targets = sorted(p.name.replace("_hrT2", "_Label") for p in (data / "training_target").glob("*_hrT2.nii.gz"))
    for k in range(1, rounds + 1):
        round_dir = out / "07_self_training" / f"round_{k}"
        assert sorted(p.name for p in (round_dir / "pseudo_labels").glob("*.nii.gz")) == targets
        for structure in ("vs", "cochlea"):
            manifest = json.loads((round_dir / structure / "manifest.json").read_text())
            real = [p for p in manifest["training_pairs"] if p[4]]
            assert len(real) == len(targets)
            # Intermediate rounds keep the stage-06 set; the last trains on real hrT2 only.
            assert (len(real) == len(manifest["training_pairs"])) == (k == rounds)
            assert manifest["clip_percentile"] == (95.0 if structure == "cochlea" else None)
    dice = pd.read_csv(out / "07_self_training" / "dice_by_round.csv")
    assert sorted(dice["round"].unique()) == list(range(1, rounds + 1)) and {"vs_dice", "cochlea_dice"} <= set(dice.columns)
    # Submission-format predictions for every validation and test case.
    for path in sorted((data / "validation").glob("*_hrT2.nii.gz")) + sorted((data / "test").glob("*_hrT2.nii.gz")):
        label = sitk.ReadImage(str(out / "08_inference" / "predictions" / inference.label_name(path.name)))
        assert cio.geometry_mismatch(label, sitk.ReadImage(str(path))) is None
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1, 2}
    assert (out / "08_inference" / "models" / "inference.json").is_file() and (out / "08_inference" / "figures" / "validation_predictions.png").is_file()


@pytest.mark.notebook
def test_smoke_09_outputs_rebuild_from_csv(smoke_run, tmp_path):
    from crossmoda_lib import metrics, report

    tmp, _ = smoke_run
    stage = tmp / "outputs" / "09_evaluation"
    scores = pd.read_csv(stage / "scores.csv")
    # Reported on the test split; the validation split (where settings are chosen) scored beside.
    split_cases = lambda split: sorted(p.name.removesuffix("_hrT2.nii.gz") for p in (tmp / "data" / split).glob("*_hrT2.nii.gz"))  # noqa: E731
    assert list(scores.columns[:6]) == [*metrics.OFFICIAL_COLUMNS, "Centre"] and sorted(scores.Case) == split_cases("test") != []
    assert sorted(pd.read_csv(stage / "scores_validation.csv").Case) == split_cases("validation") != []
    for name in ("table1", "per_centre_mean_std", "per_centre_median_iqr", "ablations", "challenge_ranking"):
        for suffix in (".md", ".csv", ".tex"):
            assert (stage / "tables" / f"{name}{suffix}").is_file(), name + suffix
    assert (stage / "figures" / "scores_by_centre.png").is_file() and (stage / "figures" / "figure4.png").is_file()
    # Tables rebuild from the saved CSV alone (no model, no image) and equal the saved ones.
    rebuilt = report.table1(pd.read_csv(stage / "scores.csv"), "this run")
    report.save_table(rebuilt, tmp_path / "table1", "Dice and ASSD (mm), mean ± std")
    assert (tmp_path / "table1.md").read_text() == (stage / "tables" / "table1.md").read_text()
    ranking_md = (stage / "tables" / "challenge_ranking.md").read_text()
    assert ranking_md.index("ne2e") < ranking_md.index("MAI") < ranking_md.index("LaTIM")


@pytest.mark.notebook
def test_09_without_ground_truth_reports_predicted_volumes_and_exits_0(smoke_run, tmp_path):
    """Real data: the crossMoDA validation and test labels are not public. 09 must end well, with
    the predicted volumes, the figures that need no truth, and a clear note that no scores exist."""
    from crossmoda_lib import metrics

    tmp, _ = smoke_run
    out = tmp_path / "outputs"
    for stage in ("07_self_training", "08_inference"):
        shutil.copytree(tmp / "outputs" / stage, out / stage)
    (tmp_path / "no_truth").mkdir()
    profile = yaml.safe_load(_smoke_profile(tmp_path).read_text())
    profile["common"].update(data_dir=str(tmp / "data"), output_dir=str(out))
    profile["notebooks"]["09_evaluation"]["truth_dir"] = str(tmp_path / "no_truth")
    path = tmp_path / "no_truth.yaml"
    path.write_text(yaml.safe_dump(profile))
    manifest = runs.run_profile(path, ["09_evaluation"], progress=False)
    assert [n["status"] for n in manifest["notebooks"]] == ["ok"]
    stage = out / "09_evaluation"
    assert not (stage / "scores.csv").exists() and not (stage / "tables" / "table1.md").exists()
    volumes = pd.read_csv(stage / "volumes.csv")
    test_cases = sorted(p.name.removesuffix("_hrT2.nii.gz") for p in (tmp / "data" / "test").glob("*_hrT2.nii.gz"))
    assert sorted(volumes.Case) == test_cases
    # The volumes are those of the predictions, in mm3 (voxel count x voxel volume).
    import SimpleITK as sitk

    row = volumes.iloc[0]
    label = sitk.ReadImage(str(out / "08_inference" / "predictions" / f"{row.Case}_Label.nii.gz"))
    voxels = int((sitk.GetArrayViewFromImage(label) == 1).sum())
    assert row.VS_predicted_mm3 == pytest.approx(voxels * np.prod(label.GetSpacing()))
    assert (stage / "figures" / "predicted_volumes_by_centre.png").is_file() and (stage / "figures" / "figure4.png").is_file()
    assert (stage / "tables" / "challenge_ranking.md").is_file(), "the ranking reproduction needs no truth"
    saved = json.loads((stage / "manifest.json").read_text())
    assert saved["scored"] is False and saved["truth"] is None
    printed = "".join(o.get("text", "") for c in nbformat.read(out / "executed" / "09_evaluation.ipynb", as_version=4).cells if c.cell_type == "code" for o in c.outputs)
    assert "NO SCORES" in printed
    assert not metrics.has_truth(tmp_path / "no_truth", test_cases) and metrics.has_truth(tmp / "data" / "synthetic_truth", test_cases)


@pytest.mark.notebook
def test_two_smoke_runs_with_the_same_seed_give_identical_scores(smoke_run, tmp_path):
    tmp, _ = smoke_run
    runs.run_profile(_smoke_profile(tmp_path), progress=False)
    first = (tmp / "outputs" / "09_evaluation" / "scores.csv").read_bytes()
    assert (tmp_path / "outputs" / "09_evaluation" / "scores.csv").read_bytes() == first


@pytest.mark.notebook
def test_an_ablation_reuses_finished_stages_and_runs_without_self_training(smoke_run, tmp_path):
    tmp, _ = smoke_run
    profile = {
        "extends": str(_smoke_profile(tmp)),
        "common": {"profile": "smoke_no_self_training", "output_dir": str(tmp_path / "ablation")},
        "reuse": {"from": str(tmp / "outputs"), "notebooks": ["01_preprocess", "02_cyclegan", "03_translate", "04_singan", "05_tumor_blending", "06_segmentation"]},
        "notebooks": {"07_self_training": {"self_training": False}, "09_evaluation": {"ablation_dirs": [str(tmp / "outputs")]}},
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(profile))
    manifest = runs.run_profile(path, progress=False)
    assert [n["notebook"] for n in manifest["notebooks"]] == ["notebooks/07_self_training.ipynb", "notebooks/08_inference.ipynb", "notebooks/09_evaluation.ipynb"]
    assert sorted(manifest["reused"]) == profile["reuse"]["notebooks"]
    final = selftraining.final_models(tmp_path / "ablation" / "07_self_training")
    assert final["vs"] == (tmp_path / "ablation" / "06_segmentation" / "vs").resolve()
    stored = json.loads((tmp_path / "ablation" / "07_self_training" / "manifest.json").read_text())["final_models"]
    assert stored["vs"] == "../06_segmentation/vs"  # relative: an output folder can be moved whole
    ablation = (tmp_path / "ablation" / "09_evaluation" / "tables" / "ablations.md").read_text()
    run_names = {line.split("|")[1].strip() for line in ablation.splitlines() if line.startswith("| ")}
    assert {"smoke", "smoke_no_self_training"} <= run_names
    assert runs.stale_reuse(tmp_path / "ablation") == {}
    # An --only run checks the reused stages it does not run against the same settings.
    again = runs.run_profile(path, ["09_evaluation"], progress=False)
    assert sorted(again["reused"]) == profile["reuse"]["notebooks"]
    assert [n["notebook"] for n in again["notebooks"]][-1] == "notebooks/09_evaluation.ipynb"
    # Reuse is refused when the earlier run used other settings.
    profile["notebooks"]["01_preprocess"] = {"centre_percentile": 80.0}
    profile["common"]["output_dir"] = str(tmp_path / "other")
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(config.ProfileError, match=r"reuse of 01_preprocess .*parameters differ \(\['centre_percentile'\]\)"):
        runs.run_profile(path, progress=False)
    # ... and when it ran other CPU kernels (another draw), where this CPU can pin them.
    if devices.cpu_has_avx2():
        del profile["notebooks"]["01_preprocess"]
        profile["common"]["cpu_kernels"] = "native"
        path.write_text(yaml.safe_dump(profile))
        with pytest.raises(config.ProfileError, match=r"ran with cpu_kernels avx2, this profile with native: its stages would be another draw"):
            runs.run_profile(path, progress=False)


def test_reuse_replaces_a_stage_left_by_an_earlier_run_and_checks_the_kernels(tmp_path):
    """An ablation's folder may hold a stage from an earlier run of it (made from the source before
    the source was re-run): reuse must give it the source's files, not keep the old ones."""
    source, out = tmp_path / "demo", tmp_path / "no_tba"
    cio.write_text_atomic(source / "02_cyclegan" / "checkpoint.pt", "the source's draw")
    manifest = {"machine": {"cpu_kernels": "native"}, "notebooks": [{"notebook": "notebooks/02_cyclegan.ipynb", "status": "ok", "parameters": {"lr": 1.0}}]}
    (source / "run_manifest.json").write_text(json.dumps(manifest))
    cio.write_text_atomic(out / "02_cyclegan" / "checkpoint.pt", "an older draw")
    cio.write_text_atomic(out / "02_cyclegan" / "stray.csv", "from the older run")
    profile = {"path": "no_tba.yaml", "common": {"cpu_kernels": "native"}, "reuse": {"from": str(source), "notebooks": ["02_cyclegan"]}}
    plan = [(Path("notebooks/02_cyclegan.ipynb"), {"lr": 1.0})]
    assert runs._reuse_stages(profile, plan, out, tmp_path) == {"02_cyclegan": str(source / "02_cyclegan")}
    assert sorted(p.name for p in (out / "02_cyclegan").iterdir()) == ["checkpoint.pt"]
    assert (out / "02_cyclegan" / "checkpoint.pt").read_text() == "the source's draw"
    assert not list(out.glob(".02_cyclegan.*"))  # no temporary folder left
    # Stages made with other CPU kernels are another draw: refused, naming both.
    manifest["machine"] = {"ATEN_CPU_CAPABILITY": "avx2"}  # a run made before cpu_kernels was recorded
    (source / "run_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(config.ProfileError, match=r"ran with cpu_kernels avx2, this profile with native"):
        runs._reuse_stages(profile, plan, out, tmp_path)


def test_an_ablation_made_from_stages_re_run_since_is_stale(tmp_path):
    """Reused stages are hard links of the source run's files; when the source re-runs a stage
    (atomic writes: new files), the ablation's copy is another run's, and ``stale_reuse`` says so."""
    source = tmp_path / "demo"
    for folder, name in (("02_cyclegan", "checkpoint.pt"), ("05_blending", "augmentations.csv")):
        cio.write_text_atomic(source / folder / name, f"{folder} run 1")
    ablation = tmp_path / "no_tba"
    for folder in ("02_cyclegan", "05_blending"):
        shutil.copytree(source / folder, ablation / folder, copy_function=runs._link_or_copy)
    reused = {"02_cyclegan": str(source / "02_cyclegan"), "05_tumor_blending": str(source / "05_blending")}
    (ablation / "run_manifest.json").write_text(json.dumps({"profile": "no_tba", "reused": reused}))
    assert runs.stale_reuse(ablation) == {}
    assert runs.stale_reuse(tmp_path / "never_run") == {}
    time.sleep(0.01)
    cio.write_text_atomic(source / "05_blending" / "augmentations.csv", "05_blending run 2")
    stale = runs.stale_reuse(ablation)
    assert list(stale) == ["05_tumor_blending"] and "augmentations.csv" in stale["05_tumor_blending"]
    assert (ablation / "05_blending" / "augmentations.csv").read_text() == "05_blending run 1"  # the ablation's copy is untouched
    shutil.rmtree(source / "02_cyclegan")
    assert "no longer exists" in runs.stale_reuse(ablation)["02_cyclegan"]


def test_an_ablation_run_with_settings_its_profile_no_longer_gives_is_outdated(tmp_path):
    """``outdated_parameters`` compares the parameters a run recorded with what its profile file
    gives now: a change of the profile it extends makes the run's comparison two changes, not one."""
    smoke = config.merged_profile(config.project_root() / "params" / "smoke.yaml")
    base = tmp_path / "base.yaml"  # the demo profile's role; ablations extend it
    base.write_text(yaml.safe_dump(smoke))
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(yaml.safe_dump({"extends": str(base), "notebooks": {"07_self_training": {"self_training": False}}}))
    notebooks = {nb.stem: nb for nb in runs.discover_notebooks()}
    run = tmp_path / "run"
    run.mkdir()

    def record(profile_file) -> None:
        profile = config.load_profile(ablation)
        entries = [
            {"notebook": f"notebooks/{stem}.ipynb", "status": "ok", "parameters": config.notebook_parameters(profile, stem, runs.declared_parameters(notebooks[stem]))}
            for stem in ("06_segmentation", "07_self_training", "09_evaluation")
        ]
        entries.append({"notebook": "notebooks/08_inference.ipynb", "status": "failed", "parameters": {}})
        (run / "run_manifest.json").write_text(json.dumps({"profile": "ablation", "profile_file": str(profile_file), "notebooks": entries}))

    record(ablation)
    assert runs.outdated_parameters(run) == {}
    # The base profile changes two settings of 06 after the run: the run is outdated there only.
    smoke["notebooks"]["06_segmentation"].update(vs_fg_jitter=0.2, epochs=3)
    smoke["notebooks"]["09_evaluation"]["bootstrap"] = 7  # its own evaluation: not a change of the run
    base.write_text(yaml.safe_dump(smoke))
    assert runs.outdated_parameters(run) == {"06_segmentation": ["epochs", "vs_fg_jitter"]}
    record(tmp_path / "gone.yaml")
    assert runs.outdated_parameters(run) == {}  # the profile file is gone: nothing to compare with
    assert runs.outdated_parameters(tmp_path / "never_run") == {}


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _tensors(value, prefix: str = "") -> dict:
    """Every tensor of a checkpoint payload, by its path in the payload."""
    import torch

    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _tensors(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _tensors(item, f"{prefix}/{i}").items()}
    return {}


@pytest.mark.notebook
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_run_killed_in_02_and_interrupted_in_06_resumes_to_an_uninterrupted_runs_results(smoke_run, tmp_path):
    """SIGKILL of `crossmoda run` during 02, then Ctrl-C (SIGINT to its process group) during 06: no
    process of the run is left, and a rerun ends with the scores, predictions and weights of the
    uninterrupted smoke run."""
    tmp, _ = smoke_run
    profile = _smoke_profile(tmp_path)
    out = tmp_path / "outputs"

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "crossmoda_lib", "run", str(profile), "--no-progress"], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def stop(proc: subprocess.Popen, how: str) -> None:
        family = _descendants(proc.pid)
        assert family, "the run has a kernel"
        if how == "SIGKILL":
            proc.kill()  # the run only, as `kill -9 <pid>` would: its kernel and workers must follow
        else:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        proc.communicate(timeout=300)
        assert proc.returncode != 0
        _wait_for(lambda: not any(_alive(p) for p in family), 60, f"the processes of the run to end after {how}")

    import signal

    proc = start()
    _wait_for(lambda: any((out / "02_cyclegan").rglob("checkpoint.pt")), 600, "a first 02 checkpoint")
    # Meanwhile a second run on the same output folder is refused, naming the first.
    with pytest.raises(cio.FolderLocked, match=rf"pid {proc.pid}, crossmoda run"):
        runs.run_profile(profile, progress=False)
    stop(proc, "SIGKILL")
    assert not (out / "02_cyclegan" / "manifest.json").exists(), "killed during 02"
    proc = start()
    _wait_for(lambda: any((out / "06_segmentation").rglob("history.csv")), 900, "a first 06 epoch")
    stop(proc, "SIGINT")
    assert not (out / "06_segmentation" / "manifest.json").exists(), "interrupted during 06"
    runs.run_profile(profile, progress=False)
    ref = tmp / "outputs"
    assert (out / "09_evaluation" / "scores.csv").read_bytes() == (ref / "09_evaluation" / "scores.csv").read_bytes()
    ours = sorted(p.relative_to(out) for p in (out / "08_inference" / "predictions").glob("*_Label.nii.gz"))
    assert ours and ours == sorted(p.relative_to(ref) for p in (ref / "08_inference" / "predictions").glob("*_Label.nii.gz"))
    assert all((out / p).read_bytes() == (ref / p).read_bytes() for p in ours)
    checkpoints = sorted(p.relative_to(out) for stage in ("02_cyclegan", "06_segmentation", "07_self_training") for p in (out / stage).rglob("checkpoint.pt"))
    assert checkpoints
    for rel in checkpoints:
        mine, theirs = _tensors(cio.load_checkpoint(out / rel)), _tensors(cio.load_checkpoint(ref / rel))
        assert mine.keys() == theirs.keys(), rel
        assert all(mine[k].equal(theirs[k]) for k in mine), rel
    assert not [p for p in out.rglob("*") if ".partial" in p.name], "no partial file survives the rerun"


def test_demo_and_smoke_are_the_paper_plus_their_differences():
    """params/paper.yaml states every setting; demo.yaml and smoke.yaml extend it and list only what
    they change (a key repeated with the paper's value would hide which settings are the demo's own),
    and every one of the demo's changes carries its reason as a comment."""
    import re

    paper = config.load_profile(ROOT / "params" / "paper.yaml")
    assert "extends" not in yaml.safe_load((ROOT / "params" / "paper.yaml").read_text())
    for name in ("demo", "smoke"):
        raw = yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text())
        assert raw["extends"] == "paper.yaml", name
        sections = [("common", raw["common"], paper["common"])] + [(nb, keys, paper["notebooks"][nb]) for nb, keys in raw["notebooks"].items()]
        for section, keys, base in sections:
            for key, value in keys.items():
                assert key in base, f"{name}.yaml: {section}.{key} is not a setting of paper.yaml"
                assert value != base[key], f"{name}.yaml: {section}.{key} repeats the paper's value {value!r}"
    text = (ROOT / "params" / "demo.yaml").read_text()
    lines = text.splitlines()
    uncommented = [line.split(":")[0].strip() for above, line in zip(["", *lines], lines) if re.match(r"^ {4}\w+:", line) and "#" not in line and not above.strip().startswith("#")]
    assert uncommented == [], f"demo.yaml: settings changed without a reason: {uncommented}"


def test_profile_diff_lists_every_difference_side_by_side(capsys):
    from crossmoda_lib import cli

    assert cli.main(["profile", "diff", "paper", "demo"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:-1]}
    assert rows["02_cyclegan.ngf"] == ["64", "8"] and rows["06_segmentation.optimizer"] == ["sgd", "adam"]
    differences = config.profile_differences(config.load_profile(ROOT / "params" / "paper.yaml"), config.load_profile(ROOT / "params" / "demo.yaml"))
    assert out[-1] == f"{len(differences)} settings differ" and len(rows) == len(differences) > 40
    assert "02_cyclegan.lambda_cycle" not in rows  # the same in both
    assert cli.main(["profile", "show", "demo"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["notebooks"] == config.load_profile(ROOT / "params" / "demo.yaml")["notebooks"]
    assert cli.main(["profile", "diff", "paper", "nonexistent"]) == 2
    assert "nonexistent: profile file not found" in capsys.readouterr().err


@pytest.mark.notebook
def test_the_book_renders_every_notebook_figure_and_table_of_a_finished_run(smoke_run, tmp_path):
    """``crossmoda book``: an index (the method picture, the headline table, a link per stage), the
    nine executed notebooks with every figure they show, and a results page with every table and
    figure stage 09 saved; built from the saved outputs only, replacing the previous site whole."""
    import base64
    import re

    from crossmoda_lib import book, cli

    tmp, _ = smoke_run
    out = tmp / "outputs"
    site = book.build(out, tmp_path / "site")
    pages = sorted(p.name for p in site.glob("*.html"))
    assert pages == sorted(["index.html", "results.html", *(f"{p.stem}.html" for p in NOTEBOOKS)])
    index = (site / "index.html").read_text()
    for nb in NOTEBOOKS:
        assert f'href="{nb.stem}.html"' in index
        executed = nbformat.read(out / "executed" / nb.name, as_version=4)
        shown = [o["data"]["image/png"] for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        html = (site / f"{nb.stem}.html").read_text()
        assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', html)) == len(shown), nb.stem
        assert all(png.strip().replace("\n", "")[:200] in html.replace("\n", "") for png in shown), nb.stem
        assert 'href="index.html"' in html
    assert base64.b64encode(book.method_picture()).decode()[:200] in index
    headline = (out / "09_evaluation" / "tables" / "table1.md").read_text()
    assert headline.splitlines()[0] in index
    results = (site / "results.html").read_text()
    tables = sorted((out / "09_evaluation" / "tables").glob("*.md"))
    figures = sorted((out / "09_evaluation" / "figures").glob("*.png"))
    assert tables and figures
    assert all(t.stem in results for t in tables) and len(re.findall(r'<img[^>]*src="data:image/png;base64,', results)) == len(figures)
    # Built again: the same pages, no staging folder left; a run without notebooks is refused by name.
    (site / "stale.html").write_text("from an older build")
    assert cli.main(["book", str(out), "-o", str(site)]) == 0
    assert sorted(p.name for p in site.glob("*.html")) == pages and not list(tmp_path.glob(".site*"))
    assert cli.main(["book", str(tmp_path / "nothing")]) == 2


EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


@pytest.mark.notebook
@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_an_exercise_runs_on_a_finished_run_and_its_worked_answer_holds(smoke_run, path, tmp_path):
    """docs/course.md's exercises: committed without outputs, a tagged parameters cell naming the run,
    and a worked solution whose cells assert the answer's claims on the run's own numbers."""
    import papermill

    source = nbformat.read(path, as_version=4)
    code = [c for c in source.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", []) and "output_dir" in code[0].source
    assert any("solution" in c.metadata.get("tags", []) and "assert" in c.source for c in code)
    tmp, _ = smoke_run
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters={"output_dir": str(tmp / "outputs")}, kernel_name=runs.KERNEL_NAME, cwd=str(ROOT), progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    assert not any(o.get("output_type") == "error" for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
