"""Stage 08 inference: grids, resampling back to the original hrT2, submission format, `crossmoda predict`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmoda_lib import cli, inference, preprocess, segmentation
from crossmoda_lib import io as cio

PRE = preprocess.PreprocessConfig((0.6, 0.6, 1.0), (176, 144))


def _hrT2(cohort: Path, split: str = "validation", centre: str = "ldn") -> tuple[sitk.Image, sitk.Image]:
    path = sorted((cohort / split).glob(f"*_{centre}_*_hrT2.nii.gz"))[0]
    truth = cohort / "synthetic_truth" / path.name.replace("_hrT2", "_hrT2_Label")
    return sitk.ReadImage(str(path)), sitk.ReadImage(str(truth))


def test_the_model_grid_is_the_stage01_crop_at_any_spacing(cohort):
    image, label = _hrT2(cohort, centre="etz")
    processed, _, _ = preprocess.preprocess_image(image, label, PRE)
    grid, lo, hi = inference.model_grid(image, PRE)
    assert grid.size == processed.GetSize() and np.allclose(grid.origin, processed.GetOrigin()) and grid.direction == processed.GetDirection()
    fine, lo2, hi2 = inference.model_grid(image, PRE, (0.4, 0.4, 1.0))
    assert (lo2, hi2) == (lo, hi)
    # The same physical box: same centre, same extent (to one fine voxel), 1.5x the voxels in-plane.
    centre = grid.point((np.array(grid.size) - 1) / 2)
    assert np.allclose(fine.point((np.array(fine.size) - 1) / 2), centre, atol=0.21)
    assert fine.size[:2] == (264, 216) and fine.size[2] == grid.size[2]
    assert np.allclose(np.array(fine.size) * fine.spacing, np.array(grid.size) * grid.spacing, atol=0.41)


@pytest.mark.parametrize("spacing", [(0.6, 0.6, 1.0), (0.4, 0.4, 1.0)])
def test_a_label_taken_to_the_working_grid_and_back_agrees_with_itself(cohort, spacing):
    """The resampling path of a prediction: probabilities on the working grid, linear back to the
    original grid, threshold 0.5 (VS largest component)."""
    for centre in ("ldn", "etz"):
        image, truth = _hrT2(cohort, centre=centre)
        grid, _, _ = inference.model_grid(image, PRE, spacing)
        on_grid = {v: inference.resample_image(sitk.Cast(truth == v, sitk.sitkFloat32), grid) for v in (1, 2)}
        back = inference.compose_label(inference.probability_on(on_grid[1], image), inference.probability_on(on_grid[2], image))
        t = sitk.GetArrayFromImage(truth)
        assert segmentation.dice_score(back == 1, t == 1) > 0.95, centre
        assert segmentation.dice_score(back == 2, t == 2) > 0.8, centre
        assert back.shape == t.shape


def _toy_models(tmp_path: Path, cohort: Path) -> Path:
    """Two tiny trained ensembles (real training code, one epoch) and their bundle."""
    image, truth = _hrT2(cohort, split="training_target")
    processed, label, _ = preprocess.preprocess_image(image, truth, PRE)
    cio.write_image(processed, tmp_path / "train" / "crossmoda2021_ldn_900_hrT2.nii.gz")
    cio.write_image(label, tmp_path / "train" / "crossmoda2021_ldn_900_Label.nii.gz")
    pair = segmentation.Pair("crossmoda2021_ldn_900", tmp_path / "train" / "crossmoda2021_ldn_900_hrT2.nii.gz", tmp_path / "train" / "crossmoda2021_ldn_900_Label.nii.gz", False, True)
    cfg = segmentation.SegConfig(spacing=(1.0, 0.6, 0.6), patch_size=(16, 48, 48), base_filters=2, max_filters=16, epochs=1, iterations_per_epoch=2, overlap=0.0, mirror_tta=False, val_every=0)
    for structure in ("vs", "cochlea"):
        segmentation.train_structure([pair], structure, cfg, 1, tmp_path / "models" / structure, clip_percentile=95.0 if structure == "cochlea" else None, progress=False)
    inference.write_bundle(tmp_path / "bundle", PRE, tmp_path / "models" / "vs", tmp_path / "models" / "cochlea", cochlea_sharpen=inference.Sharpening())
    return tmp_path / "bundle"


def test_predictions_have_the_input_geometry_and_crossmoda_values(tmp_path, cohort):
    bundle_dir = _toy_models(tmp_path, cohort)
    payload = json.loads((bundle_dir / "inference.json").read_text())
    assert not Path(payload["vs"]).is_absolute(), "model folders are stored relative to the bundle"
    bundle = inference.load_bundle(bundle_dir)
    assert bundle.cochlea.clip_percentile == 95.0 and bundle.vs.clip_percentile is None and bundle.cochlea.sharpen is not None
    rows = inference.predict_folder(cohort / "validation", tmp_path / "pred", bundle_dir, progress=False)
    inputs = sorted((cohort / "validation").glob("*_hrT2.nii.gz"))
    assert [r["label"] for r in rows] == [inference.label_name(p.name) for p in inputs]
    for path in inputs:
        image = sitk.ReadImage(str(path))
        label = sitk.ReadImage(str(tmp_path / "pred" / inference.label_name(path.name)))
        assert cio.geometry_mismatch(label, image) is None
        assert label.GetSize() == image.GetSize() and label.GetOrigin() == image.GetOrigin() and label.GetDirection() == image.GetDirection()
        assert label.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1, 2}
    # Existing predictions are kept (resume) unless overwritten.
    again = inference.predict_folder(cohort / "validation", tmp_path / "pred", bundle_dir, progress=False)
    assert {r["status"] for r in again} == {"kept"}
    # ... but recomputed when the models changed since.
    ckpt = tmp_path / "models" / "vs" / "fold_0" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes())
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    changed = inference.predict_folder(cohort / "validation", tmp_path / "pred", bundle_dir, progress=False)
    assert {r["status"] for r in changed} == {"written"}
    # Each written row says what the cochlea post-processing (here: every component kept) removed.
    for row in changed:
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / row["label"])))
        assert row["cochlea_voxels"] == int((written == 2).sum()) and row["cochlea_mm3_removed"] == 0.0
        assert row["cochlea_components_kept"] == row["cochlea_components_found"]


def test_the_cochlea_report_counts_components_and_the_volume_removed():
    """Two cochlea-sized blobs and a small piece on a 0.5 x 0.5 x 1.0 mm grid (0.25 mm3 per voxel):
    keeping the two largest removes the piece (2 x 3 x 4 voxels) and a voxel that touches a blob at a
    corner only (6-connectivity, as the post-processing: a component of its own), 25 x 0.25 mm3."""
    before = np.zeros((10, 20, 30), bool)
    before[1:5, 2:8, 2:8] = True  # 144 voxels
    before[1:6, 10:16, 20:26] = True  # 180 voxels
    before[7:9, 15:18, 10:14] = True  # 24 voxels, the piece
    before[5, 8, 8] = True  # touches the first blob at a corner only: a fourth component, 1 voxel
    after = segmentation.largest_components(before, 2).astype(bool)
    report = inference.cochlea_report(before, after, 0.5 * 0.5 * 1.0)
    assert report == {"cochlea_components_found": 4, "cochlea_components_kept": 2, "cochlea_mm3_removed": 6.25}
    assert inference.cochlea_report(before, before, 0.25)["cochlea_mm3_removed"] == 0.0
    assert inference.cochlea_report(before & False, before & False, 0.25) == {"cochlea_components_found": 0, "cochlea_components_kept": 0, "cochlea_mm3_removed": 0.0}


def test_bundle_records_the_cochlea_post_processing(tmp_path):
    for structure in ("vs", "cochlea"):
        (tmp_path / "models" / structure).mkdir(parents=True)
        (tmp_path / "models" / structure / "manifest.json").write_text("{}")
    models = (tmp_path / "models" / "vs", tmp_path / "models" / "cochlea")
    inference.write_bundle(tmp_path / "b", PRE, *models, cochlea_sharpen=None)
    assert inference.read_bundle_file(tmp_path / "b")["cochlea_components"] == 0  # the paper's default
    inference.write_bundle(tmp_path / "b", PRE, *models, cochlea_sharpen=None, cochlea_components=2)
    assert inference.read_bundle_file(tmp_path / "b")["cochlea_components"] == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cochlea_components"):
            inference.write_bundle(tmp_path / "c", PRE, *models, cochlea_sharpen=None, cochlea_components=bad)
    assert not (tmp_path / "c").exists()
    payload = json.loads((tmp_path / "b" / "inference.json").read_text())
    (tmp_path / "b" / "inference.json").write_text(json.dumps({**payload, "cochlea_components": "2"}))  # edited by hand
    with pytest.raises(cio.DataError, match=r"inference.json: cochlea_components"):
        inference.read_bundle_file(tmp_path / "b")


def test_label_names_follow_the_submission_convention():
    assert inference.label_name("crossmoda2022_etz_105_hrT2.nii.gz") == "crossmoda2022_etz_105_Label.nii.gz"
    assert inference.label_name("scan.nii.gz") == "scan_Label.nii.gz"


def test_predict_rejects_a_bad_file_before_loading_models(tmp_path, cohort, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    good = sorted((cohort / "validation").glob("*_hrT2.nii.gz"))[0]
    shutil.copy(good, src / good.name)
    (src / "crossmoda2022_etz_999_hrT2.nii.gz").write_bytes(good.read_bytes()[:5000])  # truncated
    loaded = []
    monkeypatch.setattr(inference, "load_bundle", lambda *a, **k: loaded.append(a))
    with pytest.raises(cio.DataError, match="crossmoda2022_etz_999_hrT2.nii.gz"):
        inference.predict_folder(src, tmp_path / "out", tmp_path / "no_models", progress=False)
    assert not loaded and not (tmp_path / "out").exists()
    code = cli.main(["predict", str(src), str(tmp_path / "out"), "--models", str(tmp_path / "no_models")])
    assert code == 2 and "crossmoda2022_etz_999_hrT2.nii.gz" in capsys.readouterr().err
    # With good inputs, a missing bundle is named too (still before any model is read).
    (src / "crossmoda2022_etz_999_hrT2.nii.gz").unlink()
    with pytest.raises(cio.DataError, match="inference.json"):
        inference.predict_folder(src, tmp_path / "out", tmp_path / "no_models", progress=False)
    with pytest.raises(cio.DataError, match="must not be the input folder"):
        inference.predict_folder(src, src / "pred", tmp_path / "no_models", progress=False)


def test_crossmoda_predict_command_writes_labels(tmp_path, cohort, capsys):
    bundle_dir = _toy_models(tmp_path, cohort)
    src = tmp_path / "in"
    src.mkdir()
    one = sorted((cohort / "validation").glob("*_etz_*_hrT2.nii.gz"))[0]
    shutil.copy(one, src / one.name)
    assert cli.main(["predict", str(src), str(tmp_path / "out"), "--models", str(bundle_dir), "--no-progress"]) == 0
    assert (tmp_path / "out" / inference.label_name(one.name)).is_file()
    assert "1 written" in capsys.readouterr().out
