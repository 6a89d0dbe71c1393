"""Input validation: every bad input is rejected with its file named; warnings do not stop."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmoda_lib import io as cio

SRC = "training_source/crossmoda2021_ldn_1_ceT1.nii.gz"
LAB = "training_source/crossmoda2021_ldn_1_Label.nii.gz"
HRT2 = "training_target/crossmoda2022_etz_105_hrT2.nii.gz"


def _errors_for(report: cio.ValidationReport, name: str) -> list[str]:
    return [p.reason for p in report.errors if Path(p.path).name == name]


def _assert_rejected(data: Path, name: str, *keywords: str) -> None:
    report = cio.validate_dataset(data)
    assert not report.ok
    reasons = _errors_for(report, name)
    assert reasons, f"{name} not named among {[str(p) for p in report.errors]}"
    assert any(all(k.lower() in r.lower() for k in keywords) for r in reasons), reasons


def _rewrite(path: Path, arr: np.ndarray | None = None, like: sitk.Image | None = None, **geometry) -> None:
    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(arr) if arr is not None else image
    out.CopyInformation(like or image) if arr is not None else None
    for key, value in geometry.items():
        getattr(out, f"Set{key}")(value)
    cio.write_image(out, path)


def _patch_header(path: Path, offset: int, fmt: str, value) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(gzip.compress(bytes(raw)))


def test_valid_cohort_passes_with_expected_warnings_only(cohort):
    report = cio.validate_dataset(cohort)
    assert report.ok, [str(p) for p in report.errors]
    # Tilburg files are stored as scaled integers: a warning, not an error.
    assert any("scaled integer storage" in p.reason and "etz" in p.path for p in report.warnings)
    assert not any("ldn" in p.path and "scaled" in p.reason for p in report.warnings)
    text = report.summary()
    assert "training_source: 6 ceT1" in text and "London: 3 case(s)" in text and "0 error(s)" in text


def test_every_generated_hrt2_has_its_truth_at_the_helpers_path(cohort):
    """The one helper that names a ground truth finds the label of every hrT2 the generator wrote,
    from the case name or from the image's file name, with the image's geometry."""
    hrt2 = [(case, path) for split in ("training_target", "validation") for case, path in cio.iter_split(cohort, split)]
    assert hrt2
    for case, path in hrt2:
        truth = cio.truth_label_path(cohort, case)
        assert truth == cio.truth_label_path(cohort, path.name) == cohort / "synthetic_truth" / f"{case}_hrT2_Label.nii.gz"
        assert truth.exists(), truth
        assert cio.geometry_mismatch(sitk.ReadImage(str(path)), sitk.ReadImage(str(truth))) is None
    assert {p.name for p in (cohort / "synthetic_truth").iterdir()} == {cio.truth_label_path(cohort, c).name for c, _ in hrt2}


def test_simpleitk_reads_a_truncated_gzip_silently(cohort, tmp_path):
    """Why the gzip stream is checked by hand: SimpleITK returns zeros for the missing part."""
    data = (cohort / SRC).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(cut)))
    full = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / SRC)))
    assert arr.shape == full.shape and arr.sum() < full.sum()


def test_simpleitk_reads_nan_as_zero(tmp_path):
    """Why the stored voxel values are checked by hand: ITK's NIfTI reader returns 0 for NaN."""
    path = cio.write_image(sitk.GetImageFromArray(np.array([[[1.0, np.nan], [2.0, 3.0]]], dtype=np.float32)), tmp_path / "n.nii.gz")
    assert np.isnan(np.frombuffer(gzip.decompress(path.read_bytes())[352:], dtype="<f4")).any()
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()
    _, problems = cio.check_image_file(path)
    assert any("non-finite" in p.reason and "1 NaN" in p.reason for p in problems)


def test_truncated_gzip(cohort_copy):
    path = cohort_copy / SRC
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _assert_rejected(cohort_copy, path.name, "truncated")


def test_corrupt_gzip(cohort_copy):
    path = cohort_copy / SRC
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    _assert_rejected(cohort_copy, path.name, "corrupt")


def test_not_gzip_at_all(cohort_copy):
    (cohort_copy / SRC).write_bytes(b"this is not an image")
    _assert_rejected(cohort_copy, Path(SRC).name, "gzip")


def test_not_3d(cohort_copy):
    path = cohort_copy / SRC
    image = sitk.ReadImage(str(path))
    cio.write_image(sitk.JoinSeries([image, image]), path)
    _assert_rejected(cohort_copy, path.name, "not a 3D")


def test_singleton_fourth_axis_is_fine(cohort_copy):
    path = cohort_copy / HRT2
    cio.write_image(sitk.JoinSeries([sitk.ReadImage(str(path))]), path)
    report = cio.validate_dataset(cohort_copy)
    assert not _errors_for(report, path.name)
    image, problems = cio.check_image_file(path)
    assert image.GetDimension() == 3 and not [p for p in problems if p.fatal]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(cohort_copy, bad):
    path = cohort_copy / SRC
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    arr[3, 40, 50] = bad
    _rewrite(path, arr)
    _assert_rejected(cohort_copy, path.name, "non-finite")


@pytest.mark.parametrize("axis_offset, value", [(80, 0.0), (88, -1.0)])
def test_zero_or_negative_spacing(cohort_copy, axis_offset, value):
    path = cohort_copy / HRT2
    _patch_header(path, axis_offset, "<f", value)  # pixdim[1] (x) or pixdim[3] (z)
    _assert_rejected(cohort_copy, path.name, "spacing")


def test_constant_image(cohort_copy):
    path = cohort_copy / HRT2
    arr = np.full(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape, 7, dtype=np.int16)
    _rewrite(path, arr)
    _assert_rejected(cohort_copy, path.name, "constant")


@pytest.mark.parametrize(
    "change, keyword",
    [
        ({"Origin": (1.0, 0.0, 0.0)}, "origin"),
        ({"Spacing": (0.5, 0.5, 1.0)}, "spacing"),
        ({"Direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}, "direction"),
    ],
)
def test_image_label_geometry_mismatch(cohort_copy, change, keyword):
    label = cohort_copy / LAB
    image = sitk.ReadImage(str(label))
    if "Origin" in change:
        change = {"Origin": tuple(np.add(image.GetOrigin(), change["Origin"]))}
    _rewrite(label, **change)
    _assert_rejected(cohort_copy, label.name, "geometry", keyword)


def test_image_label_size_mismatch(cohort_copy):
    label = cohort_copy / LAB
    image = sitk.ReadImage(str(label))
    smaller = image[:, :, :-2]
    cio.write_image(smaller, label)
    _assert_rejected(cohort_copy, label.name, "size")


def test_small_geometry_differences_are_tolerated(cohort_copy):
    label = cohort_copy / LAB
    image = sitk.ReadImage(str(label))
    _rewrite(label, Origin=tuple(np.add(image.GetOrigin(), (1e-5, 0, 0))))
    assert not _errors_for(cio.validate_dataset(cohort_copy), label.name)


def test_label_values_outside_0_1_2(cohort_copy):
    path = cohort_copy / LAB
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    arr[arr == 2] = 3
    _rewrite(path, arr)
    _assert_rejected(cohort_copy, path.name, "outside")


def test_label_values_not_integers(cohort_copy):
    path = cohort_copy / LAB
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    arr[arr == 1] = 0.5
    _rewrite(path, arr)
    _assert_rejected(cohort_copy, path.name, "not integers")


def test_name_not_matching_the_pattern(cohort_copy):
    bad = cohort_copy / "training_target" / "crossmoda2022_etz_105_T2.nii.gz"
    os.rename(cohort_copy / HRT2, bad)
    _assert_rejected(cohort_copy, bad.name, "does not match")


def test_wrong_modality_in_split(cohort_copy):
    moved = cohort_copy / "validation" / "crossmoda2021_ldn_1_ceT1.nii.gz"
    shutil.copy(cohort_copy / SRC, moved)
    _assert_rejected(cohort_copy, moved.name, "expected hrT2")


def test_ceT1_without_its_label(cohort_copy):
    (cohort_copy / LAB).unlink()
    _assert_rejected(cohort_copy, Path(SRC).name, "without its Label")


def test_label_without_its_image(cohort_copy):
    (cohort_copy / SRC).unlink()
    _assert_rejected(cohort_copy, Path(LAB).name, "without its ceT1")


def test_empty_and_missing_splits(cohort_copy):
    for path in (cohort_copy / "validation").iterdir():
        path.unlink()
    shutil.rmtree(cohort_copy / "training_target")
    report = cio.validate_dataset(cohort_copy)
    assert any(p.path.endswith("validation") and "empty split" in p.reason for p in report.errors)
    assert any(p.path.endswith("training_target") and "missing split" in p.reason for p in report.errors)


def test_all_problems_reported_at_once(cohort_copy):
    (cohort_copy / LAB).unlink()
    path = cohort_copy / HRT2
    path.write_bytes(path.read_bytes()[:1000])
    report = cio.validate_dataset(cohort_copy)
    names = {Path(p.path).name for p in report.errors}
    assert {Path(SRC).name, path.name} <= names


def test_warnings_do_not_stop(cohort_copy):
    label = cohort_copy / LAB
    arr = np.zeros_like(sitk.GetArrayFromImage(sitk.ReadImage(str(label))))
    _rewrite(label, arr)
    tilt = np.deg2rad(10)
    direction = (np.cos(tilt), -np.sin(tilt), 0.0, np.sin(tilt), np.cos(tilt), 0.0, 0.0, 0.0, 1.0)
    for rel in (SRC, LAB):
        _rewrite(cohort_copy / rel, Direction=direction)
    report = cio.validate_dataset(cohort_copy)
    assert report.ok, [str(p) for p in report.errors]
    mine = [p.reason for p in report.warnings if Path(p.path).name in (label.name, Path(SRC).name)]
    assert any("empty label" in r for r in mine) and any("oblique" in r for r in mine)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossmoda_lib", *args], capture_output=True, text=True, timeout=300)


def test_cli_validate_valid_cohort(cohort):
    before = _snapshot(cohort)
    result = _cli("validate", str(cohort))
    assert result.returncode == 0, result.stderr
    assert "training_target" in result.stdout and "Tilburg" in result.stdout and "0 error(s)" in result.stdout
    assert _snapshot(cohort) == before, "validate must write nothing"


def test_cli_validate_invalid_cohort_one_line_per_problem(cohort_copy):
    (cohort_copy / LAB).unlink()
    path = cohort_copy / HRT2
    path.write_bytes(path.read_bytes()[:5000])
    before = _snapshot(cohort_copy)
    result = _cli("validate", str(cohort_copy))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stderr
    assert any(Path(SRC).name in line and "without its Label" in line for line in errors)
    assert any(path.name in line and "truncated" in line for line in errors)
    assert _snapshot(cohort_copy) == before


def test_cli_validate_missing_folder(tmp_path):
    result = _cli("validate", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_write_image_is_atomic_and_deterministic(tmp_path):
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    a = cio.write_image(image, tmp_path / "a" / "x.nii.gz")
    b = cio.write_image(image, tmp_path / "b" / "x.nii.gz")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.nii.gz"], "no temporary file left"


def test_scaled_nifti_round_trip(tmp_path):
    stored = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    path = cio.write_scaled_nifti(stored, tmp_path / "s.nii.gz", slope=1.5, inter=2.0)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(back, np.arange(60).reshape(3, 4, 5) * 1.5 + 2.0)
    header = cio.parse_nifti1_header(cio.read_gzip_checked(path))
    assert header.scaled and header.scl_slope == 1.5
