"""Dice, ASSD and HD95 with medpy 0.4.0 semantics; challenge rules; `crossmoda evaluate`."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from crossmoda_lib import cli, metrics
from crossmoda_lib import io as cio

SPACING = (2.0, 0.5, 0.7)  # (z, y, x) mm: anisotropic, non-unit


def test_hand_computed_values_on_tiny_masks():
    a = np.zeros((3, 4, 5), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[1, 1, 4] = True  # three voxels away along x
    assert metrics.dice(a, b) == 0.0
    assert metrics.assd(a, b, SPACING) == pytest.approx(3 * 0.7)
    # A: two voxels along x; B: one of them. d(A->B) = {0, 0.7}, d(B->A) = {0}.
    a[:] = False
    b[:] = False
    a[1, 1, 1:3] = True
    b[1, 1, 1] = True
    assert metrics.dice(a, b) == pytest.approx(2 / 3)
    # medpy 0.4.0: mean of the two directed means = (0.35 + 0) / 2; the pooled mean would be 0.2333.
    assert metrics.assd(a, b, SPACING) == pytest.approx(0.175)
    assert metrics.hd95(a, b, SPACING) == pytest.approx(np.percentile([0.0, 0.7, 0.0], 95))
    # Along z the spacing is 2 mm.
    a[:] = False
    a[0, 1, 1] = True
    assert metrics.assd(a, b, SPACING) == pytest.approx(2.0)


def test_surface_is_the_six_neighbour_erosion_with_border_voxels_on_it():
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    assert metrics.surface(cube).sum() == 26  # only the centre is interior
    full = np.ones((3, 3, 3), bool)
    # Voxels on the array border are surface (outside counts as background): all but the centre.
    assert metrics.surface(full).sum() == 26
    # 6-connectivity: a voxel whose face neighbours are all inside is interior even if a corner is not.
    block = np.zeros((5, 5, 5), bool)
    block[1:4, 1:4, 1:4] = True
    block[1, 1, 1] = False
    assert not metrics.surface(block)[2, 2, 2]


def _brute_force(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float]:
    """Independent ASSD / HD95: surfaces by explicit face-neighbour checks, all-pairs distances."""

    def surf(m):
        padded = np.pad(m, 1)
        interior = m.copy()
        for axis, step in itertools.product(range(3), (-1, 1)):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~interior) * np.asarray(spacing)

    pa, pb = surf(a), surf(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    ab, ba = d.min(axis=1), d.min(axis=0)
    return (ab.mean() + ba.mean()) / 2, float(np.percentile(np.hstack((ab, ba)), 95))


@pytest.mark.parametrize("seed", range(5))
def test_against_an_independent_brute_force_computation(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 12, 10)
    a = rng.random(shape) > 0.8
    b = rng.random(shape) > 0.85
    a[0, 0, 0] = b[-1, -1, -1] = True  # both touch the array border
    expect_assd, expect_hd95 = _brute_force(a, b, SPACING)
    assert metrics.assd(a, b, SPACING) == pytest.approx(expect_assd, rel=1e-9)
    assert metrics.hd95(a, b, SPACING) == pytest.approx(expect_hd95, rel=1e-9)
    assert metrics.dice(a, b) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_cropping_to_the_union_changes_nothing():
    rng = np.random.default_rng(7)
    a = np.zeros((40, 60, 50), bool)
    b = np.zeros_like(a)
    a[10:20, 20:35, 15:30] = rng.random((10, 15, 15)) > 0.3
    b[12:22, 22:37, 14:28] = rng.random((10, 15, 14)) > 0.3
    for f in (metrics.assd, metrics.hd95):
        assert f(a, b, SPACING, crop=True) == f(a, b, SPACING, crop=False)


def test_empty_mask_rules():
    truth = np.zeros((5, 5, 5), bool)
    truth[2, 2, 2] = True
    empty = np.zeros_like(truth)
    s = metrics.score_structure(empty, truth, SPACING)
    assert (s.dice, s.assd, s.hd95, s.status) == (0.0, 350.0, 350.0, "empty prediction")
    s = metrics.score_structure(truth, empty, SPACING)
    assert np.isnan(s.dice) and np.isnan(s.assd) and s.status == "empty truth"
    # An empty truth is never averaged silently: the summary counts scorable cases only.
    table = pd.DataFrame([{"Case": "a", "VS_Dice": 1.0}, {"Case": "b", "VS_Dice": float("nan")}])
    summary = metrics.summary_table(table)
    assert summary.loc[0, "n"] == 1 and summary.loc[0, "mean"] == 1.0


def _image(arr: np.ndarray, spacing=(0.7, 0.5, 2.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    return img


def test_evaluate_folders_pairs_cases_and_uses_the_image_spacing(tmp_path, capsys):
    truth = np.zeros((6, 10, 12), np.uint8)
    truth[2:4, 3:6, 3:7] = 1
    truth[3, 7, 9] = 2
    pred = truth.copy()
    pred[2:4, 3:6, 7] = 1  # one extra column of VS voxels along x
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    for case in ("crossmoda2021_ldn_300", "crossmoda2022_etz_300"):
        cio.write_image(_image(truth), tmp_path / "truth" / f"{case}_hrT2_Label.nii.gz")
        cio.write_image(_image(pred), tmp_path / "pred" / f"{case}_Label.nii.gz")
    table = metrics.evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert list(table.columns[:6]) == ["Case", "VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD", "Centre"]
    assert list(table.Centre) == ["London", "Tilburg"]
    assert table.VS_Dice.iloc[0] == pytest.approx(2 * 24 / (24 + 30))
    assert table.VS_ASSD.iloc[0] == pytest.approx(metrics.assd(pred == 1, truth == 1, (2.0, 0.5, 0.7)))
    assert table.Cochlea_Dice.iloc[0] == 1.0 and table.Cochlea_ASSD.iloc[0] == 0.0
    # The command writes the same table; a missing prediction is named.
    assert cli.main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"), "-o", str(tmp_path / "scores.csv")]) == 0
    assert pd.read_csv(tmp_path / "scores.csv").VS_Dice.tolist() == pytest.approx(table.VS_Dice.tolist())
    (tmp_path / "pred" / "crossmoda2022_etz_300_Label.nii.gz").unlink()
    with pytest.raises(cio.DataError, match="crossmoda2022_etz_300"):
        metrics.evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert cli.main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"), "-o", str(tmp_path / "s2.csv")]) == 2
    assert "crossmoda2022_etz_300" in capsys.readouterr().err and not (tmp_path / "s2.csv").exists()


def test_evaluate_rejects_a_label_with_bad_values_or_grid(tmp_path):
    truth = np.zeros((4, 5, 6), np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    cio.write_image(_image(truth), tmp_path / "truth" / "crossmoda2021_ldn_1_Label.nii.gz")
    cio.write_image(_image(truth * 3), tmp_path / "pred" / "crossmoda2021_ldn_1_Label.nii.gz")
    with pytest.raises(cio.DataError, match="crossmoda2021_ldn_1_Label.nii.gz"):
        metrics.evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    cio.write_image(_image(truth, spacing=(0.7, 0.5, 1.0)), tmp_path / "pred" / "crossmoda2021_ldn_1_Label.nii.gz")
    with pytest.raises(cio.DataError, match="grids differ"):
        metrics.evaluate_folders(tmp_path / "pred", tmp_path / "truth")


def test_table_layouts():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"Case": [f"crossmoda2021_ldn_{i}" for i in range(4)] + [f"crossmoda2022_etz_{i}" for i in range(4)], "VS_Dice": rng.random(8), "VS_ASSD": rng.random(8)})
    scores["Centre"] = scores.Case.map(cio.centre_of)
    table1 = metrics.formatted_table(scores.drop(columns="Centre"))
    assert table1.iloc[0]["VS_Dice"] == f"{scores.VS_Dice.mean():.4f} ± {scores.VS_Dice.std():.4f}"
    per_centre = metrics.formatted_table(scores, ["Centre"], style="median_iqr")
    ldn = scores[scores.Centre == "London"].VS_Dice
    assert per_centre.loc["London", "VS_Dice"] == f"{ldn.median():.4f} [{ldn.quantile(0.25):.4f} - {ldn.quantile(0.75):.4f}]"


def test_ablation_table_means_per_run_and_centre_and_markdown_columns(tmp_path):
    from crossmoda_lib import report

    cases = ["crossmoda2021_ldn_1", "crossmoda2021_ldn_2", "crossmoda2022_etz_1"]
    a = pd.DataFrame({"Case": cases, "VS_Dice": [0.9, 0.5, 0.2], "VS_ASSD": [1.0, 3.0, 350.0], "Cochlea_Dice": [0.7, 0.6, 0.0], "Cochlea_ASSD": [0.5, 0.7, 350.0]})
    a["Centre"] = a.Case.map(cio.centre_of)
    table = report.ablation_table({"demo": a, "copy": a.assign(VS_Dice=0.0)})
    assert table.loc[("demo", "all"), "VS_Dice"] == pytest.approx(1.6 / 3, abs=1e-4)
    assert table.loc[("demo", "London"), "VS_Dice"] == pytest.approx(0.7)
    assert table.loc[("demo", "Tilburg"), "VS_ASSD"] == pytest.approx(350.0)
    assert table.loc[("copy", "London"), "VS_Dice"] == 0.0 and table.loc[("copy", "London"), "n"] == 2
    report.save_table(table, tmp_path / "ablations", "caption")
    md = (tmp_path / "ablations.md").read_text().splitlines()
    assert md[2].replace(" ", "").startswith("|run|centre|n|VS_Dice|")
    assert "('demo'" not in "\n".join(md) and any(line.replace(" ", "").startswith("|demo|London|2|0.7|") for line in md)
    back = pd.read_csv(tmp_path / "ablations.csv", index_col=[0, 1])
    assert back.loc[("demo", "London"), "VS_Dice"] == pytest.approx(0.7)
