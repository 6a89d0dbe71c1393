"""Stage 01: spacing, physical geometry, crop rule, labels, padding, the one-lattice equivalence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from crossmoda_lib import io as cio
from crossmoda_lib import preprocess as pp

CFG = pp.PreprocessConfig(spacing=(0.6, 0.6, 1.0), crop_size=(176, 144))
CASES = [
    ("training_source/crossmoda2021_ldn_1_ceT1.nii.gz", "training_source/crossmoda2021_ldn_1_Label.nii.gz"),
    ("training_source/crossmoda2022_etz_0_ceT1.nii.gz", "training_source/crossmoda2022_etz_0_Label.nii.gz"),
    ("training_target/crossmoda2022_etz_105_hrT2.nii.gz", "synthetic_truth/crossmoda2022_etz_105_hrT2_Label.nii.gz"),
]


def _read(cohort, rel):
    return sitk.ReadImage(str(cohort / rel))


def _physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Index -> mm by hand: origin + direction @ (spacing * index)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + d @ (np.array(image.GetSpacing()) * index_xyz)


def _centroid_mm(label: sitk.Image, value: int = 1) -> np.ndarray:
    kz, jy, ix = np.nonzero(sitk.GetArrayViewFromImage(label) == value)
    return _physical(label, np.array([ix.mean(), jy.mean(), kz.mean()]))


def _landmarks_mm(label: sitk.Image) -> list[np.ndarray]:
    """VS centroid, then the cochleae's centroids from right (-x) to left (+x), in mm."""
    from scipy import ndimage

    arr = sitk.GetArrayViewFromImage(label)
    comps, n = ndimage.label(arr == 2, structure=np.ones((3, 3, 3)))
    cochleae = []
    for k in range(1, n + 1):
        kz, jy, ix = np.nonzero(comps == k)
        cochleae.append(_physical(label, np.array([ix.mean(), jy.mean(), kz.mean()])))
    assert n == 2
    return [_centroid_mm(label, 1)] + sorted(cochleae, key=lambda c: c[0])


@pytest.mark.parametrize("image_rel, label_rel", CASES)
def test_spacing_direction_and_extent(cohort, image_rel, label_rel):
    image, label = _read(cohort, image_rel), _read(cohort, label_rel)
    out, out_label, _ = pp.preprocess_image(image, label, CFG)
    assert out.GetSpacing() == (0.6, 0.6, 1.0)  # in memory: exact
    assert out.GetSize()[:2] == (176, 144)
    assert out.GetDirection() == image.GetDirection()
    assert cio.geometry_mismatch(out, out_label) is None
    # z keeps the whole extent: N = round(n * s / 1.0) slices centred on the original ones.
    n, s = image.GetSize()[2], image.GetSpacing()[2]
    assert out.GetSize()[2] == round(n * s / 1.0)
    z_in = (_physical(image, np.zeros(3))[2] + _physical(image, np.array([0, 0, n - 1]))[2]) / 2
    z_out = (_physical(out, np.zeros(3))[2] + _physical(out, np.array([0, 0, out.GetSize()[2] - 1]))[2]) / 2
    assert z_out == pytest.approx(z_in, abs=1e-6)


@pytest.mark.parametrize("image_rel, label_rel", CASES)
def test_crop_is_centred_where_the_rule_says(cohort, image_rel, label_rel):
    image = _read(cohort, image_rel)
    arr = sitk.GetArrayFromImage(image)
    kz, jy, ix = np.nonzero(arr > np.percentile(arr, 75))
    expected = _physical(image, np.array([ix.mean(), jy.mean(), kz.mean()]))
    out, _, info = pp.preprocess_image(image, None, CFG)
    size = np.array(out.GetSize())
    centre = _physical(out, (size - 1) / 2.0)
    # The window is a block of the 0.6 mm lattice: its centre is within half a voxel of the rule's point.
    assert abs(centre[0] - expected[0]) <= 0.3 + 1e-6
    assert abs(centre[1] - expected[1]) <= 0.3 + 1e-6
    assert info["crop_centre_x_mm"] == pytest.approx(expected[0], abs=1e-6)


@pytest.mark.parametrize("image_rel, label_rel", CASES)
def test_landmarks_keep_their_physical_position(cohort, image_rel, label_rel):
    image, label = _read(cohort, image_rel), _read(cohort, label_rel)
    _, out_label, _ = pp.preprocess_image(image, label, CFG)
    # Landmarks: the VS centroid and each cochlea's centroid (the two cochleae lie ~60 mm apart, so
    # their joint centroid would move with their relative volume change, not with the geometry).
    for before, after in zip(_landmarks_mm(label), _landmarks_mm(out_label)):
        shift = np.abs(after - before)
        assert np.all(shift <= np.array([0.3, 0.3, 0.5])), shift  # half an output voxel
    assert set(np.unique(sitk.GetArrayViewFromImage(out_label))) == set(np.unique(sitk.GetArrayViewFromImage(label)))
    before, after = pp.label_volumes_mm3(label), pp.label_volumes_mm3(out_label)
    assert after[1] == pytest.approx(before[1], rel=0.08)
    assert after[2] == pytest.approx(before[2], rel=0.15)


def test_bright_cube_stays_in_place():
    """An independent landmark: a 3 mm cube of ones at a known physical position, oblique-free grid
    with flipped axes (London-like); after preprocessing its intensity centroid is where it was."""
    arr = np.zeros((30, 120, 110), dtype=np.float32)
    arr[10:13, 50:57, 30:37] = 100.0  # 3 slices x 7 x 7 voxels of 0.43 mm = 3 x 3 x 3 mm
    arr += 1.0 + 0.01 * np.arange(arr.size, dtype=np.float32).reshape(arr.shape) / arr.size
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.43, 0.43, 1.0))
    image.SetOrigin((20.0, -15.0, 7.5))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    expected = _physical(image, np.array([33.0, 53.0, 11.0]))
    cfg = pp.PreprocessConfig(crop_size=(96, 96), centre_percentile=99.0, intensity_percentiles=(0.0, 100.0))
    out, _, _ = pp.preprocess_image(image, None, cfg)
    o = sitk.GetArrayFromImage(out)
    w = np.clip(o - 0.2, 0, None) * (o > 0.5)
    kz, jy, ix = np.nonzero(w)
    centroid = _physical(out, np.array([np.average(ix, weights=w[w > 0]), np.average(jy, weights=w[w > 0]), np.average(kz, weights=w[w > 0])]))
    np.testing.assert_allclose(centroid, expected, atol=0.3)


@pytest.mark.parametrize("image_rel, label_rel", CASES)
def test_direct_to_crop_grid_equals_resample_then_crop(cohort, image_rel, label_rel):
    image, label = _read(cohort, image_rel), _read(cohort, label_rel)
    direct, direct_label, _ = pp.preprocess_image(image, label, CFG)
    two_step, two_step_label = pp.resample_then_crop(image, label, CFG)
    assert cio.geometry_mismatch(direct, two_step) is None
    assert direct.GetOrigin() == two_step.GetOrigin()
    # The same sample points; values agree up to float32 rounding in ITK's index arithmetic.
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(direct), sitk.GetArrayViewFromImage(two_step), rtol=0, atol=1e-6)
    # Labels: identical, except where a sample point falls exactly half-way between two source voxels
    # (0.8 -> 0.6 mm puts every other point on such a tie) and nearest-neighbour picks a side by
    # float rounding. Every differing voxel must be such a tie.
    a, b = sitk.GetArrayViewFromImage(direct_label), sitk.GetArrayViewFromImage(two_step_label)
    differ = np.argwhere(a != b)
    assert len(differ) <= 1e-4 * a.size
    for kz, jy, ix in differ:
        c = np.array(label.TransformPhysicalPointToContinuousIndex(direct_label.TransformIndexToPhysicalPoint([int(ix), int(jy), int(kz)])))
        assert np.any(np.abs(np.abs(c - np.floor(c)) - 0.5) < 1e-4), c


def test_padding_on_small_images():
    arr = np.random.default_rng(0).uniform(10, 20, size=(12, 40, 50)).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.0, 1.0, 2.0))
    label = sitk.GetImageFromArray((arr > 19).astype(np.uint8))
    label.CopyInformation(image)
    out, out_label, info = pp.preprocess_image(image, label, pp.PreprocessConfig(crop_size=(128, 128)))
    o = sitk.GetArrayFromImage(out)
    assert o.shape == (24, 128, 128)
    # The 50 x 40 mm scan covers about 83 x 67 voxels of 0.6 mm in the middle; the rest is padding (0).
    assert info["padded_fraction"] == pytest.approx(1 - (83 * 67) / (128 * 128), abs=0.02)
    assert (o == 0).mean() >= info["padded_fraction"] - 1e-9
    assert o[:, :10, :].max() == 0 and o[:, :, :10].max() == 0
    assert o[:, 64, 64].min() > 0
    assert set(np.unique(sitk.GetArrayViewFromImage(out_label))) == {0, 1}


def test_normalisation_is_documented_and_invertible(cohort):
    image = _read(cohort, CASES[0][0])
    out, _, info = pp.preprocess_image(image, None, CFG)
    o = sitk.GetArrayFromImage(out)
    assert o.min() >= 0.0 and o.max() <= 1.0
    lo, hi = np.percentile(sitk.GetArrayViewFromImage(image), CFG.intensity_percentiles)
    assert (info["intensity_lo"], info["intensity_hi"]) == pytest.approx((lo, hi))
    full, start, grid = pp.crop_window(image, CFG)
    resampled = sitk.Resample(image, grid.reference(), sitk.Transform(), sitk.sitkLinear, lo, sitk.sitkFloat32)
    r = sitk.GetArrayFromImage(resampled)
    inside = (o > 0) & (o < 1)
    np.testing.assert_allclose(lo + o[inside] * (hi - lo), r[inside], rtol=1e-4, atol=1e-3 * (hi - lo))


def test_ceT1_normalisation_does_not_depend_on_the_tumour(cohort):
    """The London source ceT1 scans hold tumours from under 0.1% to about 1% of their voxels. The
    default upper percentile (99.9) sits above the enhancing voxels, so the brain lands at the same
    level in every case and tumours keep their contrast; 99.5 falls among them, so the brain's level
    follows the tumour's size and tumours are clipped to 1, barely above the brain (the setting this
    replaced)."""

    def levels(cfg):
        rows = []
        for case in ("crossmoda2021_ldn_1", "crossmoda2021_ldn_2", "crossmoda2021_ldn_3"):
            image = _read(cohort, f"training_source/{case}_ceT1.nii.gz")
            label = _read(cohort, f"training_source/{case}_Label.nii.gz")
            out, out_label, _ = pp.preprocess_image(image, label, cfg)
            rows.append(pp.tissue_levels(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(out_label)))
        return rows

    assert pp.PreprocessConfig().intensity_percentiles == (0.5, 99.9)
    good = levels(CFG)
    brain = [r["brain_median"] for r in good]
    assert max(brain) - min(brain) < 0.1 and all(0.4 < b < 0.7 for b in brain), brain
    assert all(r["vs_mean"] - r["brain_median"] > 0.25 for r in good), good  # the tumour enhances
    old = levels(replace(CFG, intensity_percentiles=(0.5, 99.5)))
    brain_old = [r["brain_median"] for r in old]
    assert max(brain_old) - min(brain_old) > 0.2, brain_old
    assert min(r["vs_mean"] - r["brain_median"] for r in old) < 0.2, old  # the tumour, clipped, barely above the brain


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="spacing"):
        pp.PreprocessConfig(spacing=(0.6, 0.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        pp.PreprocessConfig(crop_size=(256,))
    with pytest.raises(ValueError, match="intensity_percentiles"):
        pp.PreprocessConfig(intensity_percentiles=(99.0, 1.0))


def test_dataset_stage_writes_resumes_and_refuses_bad_places(cohort, tmp_path):
    stage = tmp_path / "01_preprocess"
    table = pp.preprocess_dataset(cohort, stage, CFG, progress=False)
    assert len(table) == 12 and set(table.split) == {"training_source", "training_target", "validation"}
    for row in table.itertuples():
        out = sitk.ReadImage(str(stage / row.file))
        # NIfTI stores pixdim as float32: exact at that precision.
        assert np.array_equal(np.float32(out.GetSpacing()), np.float32([0.6, 0.6, 1.0]))
    assert len(list((stage / "source").glob("*_Label.nii.gz"))) == 6
    assert len(list((stage / "synthetic_truth").glob("*_hrT2_Label.nii.gz"))) == 6
    stamp = (stage / "cases.csv").stat().st_mtime_ns
    again = pp.preprocess_dataset(cohort, stage, CFG, progress=False)
    assert (stage / "cases.csv").stat().st_mtime_ns == stamp and len(again) == 12
    with pytest.raises(cio.DataError, match="inside the input folder"):
        pp.preprocess_dataset(cohort, cohort / "out", CFG, progress=False)
    assert not (cohort / "out").exists()


def test_invalid_data_stops_before_anything_is_written(cohort_copy, tmp_path):
    (cohort_copy / "training_source" / "crossmoda2021_ldn_1_Label.nii.gz").unlink()
    stage = tmp_path / "stage"
    with pytest.raises(cio.DataError, match="crossmoda2021_ldn_1_ceT1.nii.gz: ceT1 without its Label"):
        pp.preprocess_dataset(cohort_copy, stage, CFG, progress=False)
    assert not stage.exists()
