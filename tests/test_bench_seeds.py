"""benchmarks/bench_seeds.py on the smoke profile: one whole run per seed, the seed table's schema,
the paper's cochlea post-processing recomputed from the same models, resumption; the summary that
README and notebook 09 quote (median, worst run, failures), against a direct computation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from crossmoda_lib import metrics, report

ROOT = Path(__file__).resolve().parent.parent


def _same(a, b) -> bool:
    """Rows equal as their JSON says (a score that is NaN, e.g. the ASSD of an empty prediction,
    equals NaN there, as it does not between two Python floats)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "benchmarks" / "bench_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.notebook
def test_bench_seeds_writes_the_seed_table_and_resumes(tmp_path):
    bench = _bench()
    args = ["--profile", str(ROOT / "params" / "smoke.yaml"), "--seeds", "0", "--native-seeds", "--root", str(tmp_path), "--oracle-iterations", "25", "--record", str(tmp_path / "record")]
    rows = bench.main(args)
    table = pd.read_csv(tmp_path / "seeds.csv")
    assert list(table.columns) == list(report.SEED_COLUMNS) and len(table) == 1 == len(rows)
    row = table.iloc[0]
    assert row.seed == 0 and row.cpu_kernels == "avx2" and row.split == "test" and row.cases == 2
    for col in ("VS_Dice", "Cochlea_Dice", "Cochlea_Dice_every_component", "London_VS_Dice", "Tilburg_Cochlea_Dice", "translation_score"):
        assert 0.0 <= row[col] <= 1.0, col
    assert row.VS_ASSD > 0 and row.Cochlea_ASSD_every_component > 0 and row.wall_min > 0 and row.draw in (0, 1)
    run = tmp_path / "seed0_avx2"
    scores = pd.read_csv(run / "09_evaluation" / "scores.csv")
    assert row.VS_Dice == pytest.approx(scores.VS_Dice.mean()) and row.Cochlea_Dice == pytest.approx(scores.Cochlea_Dice.mean())
    # The paper's rule: the same models, every cochlea component kept. The VS is untouched; the
    # cochlea keeps at least the voxels of the two largest components.
    every = metrics.evaluate_folders(run / "bench_seeds" / "predictions_every_component", run / "data" / "synthetic_truth", list(scores.Case))
    assert list(every.VS_Dice) == list(scores.VS_Dice) and row.Cochlea_Dice_every_component == pytest.approx(every.Cochlea_Dice.mean())
    for case in scores.Case:
        kept = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "08_inference" / "predictions" / f"{case}_Label.nii.gz")))
        all_parts = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "bench_seeds" / "predictions_every_component" / f"{case}_Label.nii.gz")))
        assert ((kept == 2) <= (all_parts == 2)).all()
    assert (tmp_path / "seeds.png").is_file()
    # The run's own profile: the smoke profile with this seed and its own folders.
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["parameters"]["common"]["output_dir"] == str(run)
    # Resumes: a finished run is neither re-run nor re-scored.
    stamp = (run / "run_manifest.json").stat().st_mtime_ns
    assert _same(bench.main(args), rows) and (run / "run_manifest.json").stat().st_mtime_ns == stamp
    # The committed record: the same row with its code stamp. A checkout without the run folder
    # takes it while the code is the same and runs the seed again once the code differs.
    kept = json.loads((tmp_path / "record" / "seed0_avx2.json").read_text())
    smoke = ROOT / "params" / "smoke.yaml"
    assert _same(kept, rows[0]) and kept["code"] == bench.code_stamp(profile=smoke) and row.code == kept["code"] and len(row.commit) >= 7
    assert _same(bench.recorded(tmp_path / "record", 0, "avx2", bench.code_stamp(profile=smoke)), kept)
    assert bench.recorded(tmp_path / "record", 0, "avx2", "another") is None and bench.recorded(tmp_path / "record", 1, "avx2", kept["code"]) is None
    import shutil

    shutil.rmtree(run)
    assert _same(bench.main(args), rows) and not run.exists()


def test_the_code_stamp_follows_the_computation_not_its_layout(tmp_path):
    """A recorded row is reused while the computation is the same: comments, docstrings, layout, a
    notebook's prose, a profile rewritten as another extends chain, a new module no run imports and
    a new command keep the stamp; a changed constant in the library or a notebook's code, or a
    changed setting, changes it."""
    import shutil

    import nbformat

    bench = _bench()
    for name in ("crossmoda_lib", "notebooks", "params"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "benchmarks").mkdir()
    for name in ("bench_seeds.py", "bench_translation_quality.py"):
        shutil.copy(ROOT / "benchmarks" / name, tmp_path / "benchmarks" / name)

    def stamp():
        return bench.code_stamp(tmp_path, tmp_path / "params" / "demo.yaml")

    first = stamp()
    metrics_py = tmp_path / "crossmoda_lib" / "metrics.py"
    text = metrics_py.read_text()
    assert '"""' in text
    metrics_py.write_text("# a new comment\n" + text.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n\n", 1))
    notebook = tmp_path / "notebooks" / "09_evaluation.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    next(c for c in nb.cells if c.cell_type == "markdown").source += "\n\nAnother sentence."
    nbformat.write(nb, notebook)
    demo = tmp_path / "params" / "demo.yaml"
    demo.write_text(demo.read_text().replace("extends: paper.yaml", "extends: ./paper.yaml  # the same file"))
    (tmp_path / "crossmoda_lib" / "book.py").write_text("PAGES = 9\n")  # a module no run imports
    cli = tmp_path / "crossmoda_lib" / "cli.py"
    cli.write_text(cli.read_text() + "\nNEW_COMMAND = 1\n")  # the command line dispatches; it does not compute
    assert stamp() == first
    for change in (
        lambda: metrics_py.write_text(metrics_py.read_text() + "\nEXTRA = 1\n"),
        lambda: nbformat.write(_with_code(nbformat.read(notebook, as_version=4)), notebook),
        lambda: demo.write_text(demo.read_text().replace("ngf: 8", "ngf: 9")),
    ):
        before = stamp()
        change()
        assert stamp() != before


def _with_code(nb):
    next(c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])).source += "\nx = 1"
    return nb


def test_seed_summary_reports_median_worst_and_failures():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({c: rng.random(6) for c in report.SEED_COLUMNS if c not in ("seed", "cpu_kernels", "split", "commit", "code")})
    table["seed"] = [0, 1, 2, 3, 4, 0]
    table["cpu_kernels"] = ["avx2"] * 5 + ["native"]
    table["split"] = "test"
    table.loc[1, "VS_Dice"] = 0.49  # a failed run
    table.loc[2, "VS_Dice"] = 0.50  # not failed: the bar is VS Dice < 0.5
    summary = report.seed_summary(table)
    pinned = table[table.cpu_kernels == "avx2"]
    assert summary.loc["avx2", "runs"] == 5 and summary.loc["avx2", "seeds"] == "0 1 2 3 4"
    assert summary.loc["avx2", "VS_Dice median"] == pytest.approx(round(float(np.median(pinned.VS_Dice)), 4))
    assert summary.loc["avx2", "VS_Dice worst"] == pytest.approx(round(float(pinned.VS_Dice.min()), 4))
    assert summary.loc["avx2", "VS_ASSD worst"] == pytest.approx(round(float(pinned.VS_ASSD.max()), 4))  # worst ASSD: the largest
    assert summary.loc["avx2", "failed (VS < 0.5)"] == int((pinned.VS_Dice < 0.5).sum())
    assert summary.loc["native", "runs"] == 1
    fig = report.seed_plot(table)
    assert len(fig.axes[0].collections) >= 3
