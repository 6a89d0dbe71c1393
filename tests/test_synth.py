"""The synthetic cohort: layout, names, labels, geometry, volumes in mm3, contrasts, determinism."""

from __future__ import annotations

import gzip
import json
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from crossmoda_lib import io as cio
from crossmoda_lib import synth

NAME = re.compile(r"^crossmoda(2021|2022)_(ldn|etz)_(\d+)_(ceT1|hrT2|Label)\.nii\.gz$")


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_layout_and_names(cohort):
    for split in ("training_source", "training_target", "validation"):
        names = sorted(p.name for p in (cohort / split).iterdir())
        assert names, split
        assert all(NAME.match(n) for n in names), names
    assert all(n.endswith("_ceT1.nii.gz") or n.endswith("_Label.nii.gz") for n in (p.name for p in (cohort / "training_source").iterdir()))
    # London cases are 2021-numbered from 1 (source), 106 (target), 211 (validation); Tilburg from 0, 105, 210.
    assert (cohort / "training_source" / "crossmoda2021_ldn_1_ceT1.nii.gz").exists()
    assert (cohort / "training_source" / "crossmoda2022_etz_0_Label.nii.gz").exists()
    assert (cohort / "training_target" / "crossmoda2021_ldn_106_hrT2.nii.gz").exists()
    assert (cohort / "validation" / "crossmoda2022_etz_210_hrT2.nii.gz").exists()
    # Every hrT2 has a truth label, and nothing else is in synthetic_truth/.
    hrt2 = {p.name.replace("_hrT2.nii.gz", "") for s in ("training_target", "validation") for p in (cohort / s).iterdir()}
    truth = {p.name.replace("_hrT2_Label.nii.gz", "") for p in (cohort / "synthetic_truth").iterdir()}
    assert hrt2 == truth
    infos = (cohort / "infos_source_training.csv").read_text().splitlines()
    assert infos[0] == "crossmoda_name,koos" and len(infos) == 1 + 6


def test_labels_and_geometry(cohort):
    manifest = json.loads((cohort / "manifest.json").read_text())
    for case in manifest["cases"]:
        image = sitk.ReadImage(str(cohort / case["image"]))
        label = sitk.ReadImage(str(cohort / case["label"]))
        assert cio.geometry_mismatch(image, label) is None, case["case"]
        assert image.GetSize() == label.GetSize()
        assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()
        values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
        assert values == {0, 1, 2}, case["case"]


def test_centre_grids_follow_the_design(cohort):
    manifest = json.loads((cohort / "manifest.json").read_text())
    for case in manifest["cases"]:
        sx, sy, sz = case["spacing"]
        if case["centre"] == "Tilburg":
            assert (sx, sy, sz) == ((0.8, 0.8, 1.5) if case["modality"] == "ceT1" else (0.5, 0.5, 1.0))
        else:
            assert 0.40 < sx == sy < 0.46 and sz in (1.0, 1.5)
        # The default field of view is about 100 x 90 x 44 mm.
        extent = np.array(case["size"]) * np.array(case["spacing"])
        np.testing.assert_allclose(extent, synth.ROI_FOV_MM, atol=1.6)


def test_volumes_in_mm3_match_labels_and_span_the_paper_thresholds(cohort):
    manifest = json.loads((cohort / "manifest.json").read_text())
    vs = []
    for case in manifest["cases"]:
        label = sitk.ReadImage(str(cohort / case["label"]))
        arr = sitk.GetArrayViewFromImage(label)
        voxel = float(np.prod(label.GetSpacing()))
        assert case["vs_volume_mm3"] == pytest.approx((arr == 1).sum() * voxel, abs=1e-3)
        vs.append(case["vs_volume_mm3"])
        # Two cochleae, one per side, each 60-130 mm3.
        comps, n = ndimage.label(arr == 2, structure=np.ones((3, 3, 3)))
        assert n == 2, case["case"]
        sizes = np.bincount(comps.ravel())[1:] * voxel
        assert all(60 <= s <= 130 for s in sizes), (case["case"], sizes)
        centroids = ndimage.center_of_mass(arr == 2, comps, [1, 2])
        phys_x = [label.TransformContinuousIndexToPhysicalPoint(c[::-1])[0] for c in centroids]
        assert phys_x[0] * phys_x[1] < 0, "cochleae must lie on opposite sides"
    assert min(vs) < synth.SMALL_VS_MM3 and max(vs) > synth.LARGE_VS_MM3
    koos = {c["case"]: c["koos"] for c in manifest["cases"]}
    for case in manifest["cases"]:
        if koos[case["case"]] == 1:
            assert case["vs_volume_mm3"] < synth.SMALL_VS_MM3
        if koos[case["case"]] == 4:
            assert case["vs_volume_mm3"] > synth.LARGE_VS_MM3


@pytest.mark.parametrize("spacing_zyx, rel", [((0.25, 0.25, 0.25), 0.003), ((0.5, 0.5, 0.5), 0.01), ((1.5, 0.41, 0.41), 0.02)])
def test_partial_volume_sums_to_the_analytic_volume(spacing_zyx, rel):
    """A sphere of radius 5 mm: the sum of partial-volume fractions is 4/3 pi r^3 (the first-order
    model's bias on a curved surface falls with the voxel size: 0.3% at 0.25 mm, 1% at 0.5 mm, 2% on
    1.5 mm slices)."""
    z, y, x = np.meshgrid(*(np.arange(-8.0, 8.0, s) + 0.123 for s in spacing_zyx), indexing="ij")
    sphere = synth.Ellipsoid(np.zeros(3), np.array([5.0, 5.0, 5.0]))
    f = sphere.field((x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)))
    pv = synth.partial_volume(f, spacing_zyx)
    volume = pv.sum() * np.prod(spacing_zyx)
    assert volume == pytest.approx(4 / 3 * np.pi * 125, rel=rel)
    assert pv.min() == 0.0 and pv.max() == 1.0
    # Nearest-neighbour labels (voxel centre inside) measure the same volume.
    assert (f <= 0).sum() * np.prod(spacing_zyx) == pytest.approx(4 / 3 * np.pi * 125, rel=0.03)


def test_contrasts_carry_the_domain_gap(cohort):
    """CSF-like cochlea bright on hrT2 and faint on ceT1; VS enhancing on ceT1."""
    manifest = json.loads((cohort / "manifest.json").read_text())
    for case in manifest["cases"]:
        img = _arr(cohort / case["image"]).astype(float)
        lab = _arr(cohort / case["label"])
        core = ndimage.binary_erosion(lab == 1, iterations=1)
        if core.sum() < 20:
            core = lab == 1
        vs, cochlea, median = img[core].mean(), img[lab == 2].mean(), np.median(img)
        if case["modality"] == "hrT2":
            assert cochlea > 1.8 * median and cochlea > vs, case["case"]
        else:
            assert vs > 1.5 * median and vs > 2 * cochlea, case["case"]


def _owner_map(subject, grid):
    """Index of the layer that paints each voxel centre last (-1: none), array order (z, y, x)."""
    owner = np.full(grid.size[::-1], -1, dtype=int)
    full = tuple(slice(0, n) for n in grid.size[::-1])
    q = synth._head_coordinates(grid, subject, full)
    for i, layer in enumerate(subject.layers):
        owner[layer.shape.field(q) <= 0] = i
    return owner


@pytest.mark.parametrize("centre", ["ldn", "etz"])
def test_bone_is_dark_on_both_and_darker_than_csf_on_ceT1(centre):
    """Cortical bone has no signal on either sequence; CSF is bright on hrT2 and dim (not void) on
    ceT1. Measured on rendered images, voxels owned by the petrous bones against the cistern's CSF."""
    rng = np.random.default_rng([5, 0])
    subject = synth.make_subject(rng, 3)
    names = [layer.name for layer in subject.layers]
    means = {}
    for modality in ("hrT2", "ceT1"):
        spec = synth.CENTRE_SPECS[(centre, modality)]
        pose_centre = subject.pose_rot @ np.array(synth.ROI_CENTRE) + subject.pose_shift
        grid = synth.make_grid(spec, np.random.default_rng(1), "roi", pose_centre)
        image, _ = synth.render(subject, grid, modality, spec, np.random.default_rng(2))
        owner = _owner_map(subject, grid)
        inner = lambda name: ndimage.binary_erosion(owner == names.index(name), iterations=2)  # noqa: E731 - away from partial volume
        bone = inner("petrous_left") | inner("petrous_right")
        csf = inner("cistern")
        assert bone.sum() > 500 and csf.sum() > 500
        means[modality] = (image[bone].mean() / spec.scale, image[csf].mean() / spec.scale)
    bone_t2, csf_t2 = means["hrT2"]
    bone_t1, csf_t1 = means["ceT1"]
    assert csf_t2 > 8 * bone_t2
    assert csf_t1 > 1.8 * bone_t1, f"ceT1 bone {bone_t1:.3f} vs CSF {csf_t1:.3f}: bone must be the darker"
    assert bone_t1 < 0.08 and bone_t2 < 0.08


def test_a_cohort_of_another_generator_version_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"generator": "crossmoda_lib.synth", "generator_version": "0.9"}))
    with pytest.raises(cio.DataError, match=r"data: synthetic cohort of generator version 0\.9"):
        synth.ensure_cohort(data, 0, 3, "roi")
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json"]
    (data / "manifest.json").write_text(json.dumps({"generator": "crossmoda_lib.synth", "generator_version": synth.GENERATOR_VERSION}))
    assert synth.ensure_cohort(data, 0, 3, "roi") == (data, False)


def test_a_cohort_made_with_other_settings_is_refused(tmp_path):
    """A profile whose seed, size or field of view changed must not run on the cohort of before."""
    data = tmp_path / "data"
    data.mkdir()
    made = {"generator": "crossmoda_lib.synth", "generator_version": synth.GENERATOR_VERSION, "seed": 0, "cases_per_centre": 8, "fov": "roi"}
    (data / "manifest.json").write_text(json.dumps(made))
    assert synth.ensure_cohort(data, 0, 8, "roi") == (data, False)
    with pytest.raises(cio.DataError, match=r"data: holds a synthetic cohort made with cases_per_centre 8 \(asked: 16\); delete"):
        synth.ensure_cohort(data, 0, 16, "roi")
    with pytest.raises(cio.DataError, match=r"seed 0 \(asked: 1\), cases_per_centre 8 \(asked: 4\), fov 'roi' \(asked: 'head'\)"):
        synth.ensure_cohort(data, 1, 4, "head")
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json"]  # nothing written


def test_tilburg_files_use_scaled_integer_storage(cohort):
    for path in sorted(cohort.glob("*/crossmoda2022_etz_*_ceT1.nii.gz")) + sorted(cohort.glob("*/crossmoda2022_etz_*_hrT2.nii.gz")):
        raw = gzip.decompress(path.read_bytes())
        slope, inter = struct.unpack("<2f", raw[112:120])
        assert slope != 1.0 and 0.5 < slope < 2.5 and inter == 0.0, path.name
        assert struct.unpack("<h", raw[70:72])[0] == 4  # int16 on disk
        image = sitk.ReadImage(str(path))
        stored = np.frombuffer(raw[352:], dtype="<i2").reshape(sitk.GetArrayViewFromImage(image).shape)
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(image), stored * slope, rtol=1e-5)
    for path in sorted(cohort.glob("*/crossmoda2021_ldn_*_ceT1.nii.gz")):
        raw = gzip.decompress(path.read_bytes())
        assert struct.unpack("<f", raw[112:116])[0] in (0.0, 1.0)


def test_subjects_differ_in_shape():
    """Not one template with a moved tumour: cochlea and brainstem shapes vary between subjects."""
    a = synth.make_subject(np.random.default_rng([0, 0, 0, 0]), 2)
    b = synth.make_subject(np.random.default_rng([0, 0, 0, 1]), 2)
    la, lb = {layer.name: layer for layer in a.layers}, {layer.name: layer for layer in b.layers}
    assert la["cochlea_left"].shape.major != lb["cochlea_left"].shape.major
    assert not np.allclose(la["brainstem"].shape.radii, lb["brainstem"].shape.radii)
    assert la["brainstem"].shape.lumps[0][0].tolist() != lb["brainstem"].shape.lumps[0][0].tolist()


def test_same_seed_identical_arrays_other_seed_different(cohort, tmp_path):
    again = synth.generate_cohort(tmp_path / "again", seed=0, cases_per_centre=6, progress=False, workers=1)
    first = json.loads((cohort / "manifest.json").read_text())
    assert again["cases"] == first["cases"]
    for case in first["cases"]:
        for key in ("image", "label"):
            a, b = cohort / case[key], tmp_path / "again" / case[key]
            assert a.read_bytes() == b.read_bytes(), case[key]
    img0, _, _ = synth.generate_case(0, "etz", "validation", 0, 2)
    img1, _, _ = synth.generate_case(1, "etz", "validation", 0, 2)
    assert not np.array_equal(sitk.GetArrayViewFromImage(img0), sitk.GetArrayViewFromImage(img1))


def test_a_case_does_not_depend_on_cohort_size():
    small = synth.koos_schedule(2, np.random.default_rng(0))
    assert sorted(small) == [1, 4]
    a, la, fa = synth.generate_case(3, "ldn", "training_source", 1, 3)
    b, lb, fb = synth.generate_case(3, "ldn", "training_source", 1, 3)
    assert fa == fb and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_head_fov_gives_real_matrix_sizes():
    image, label, facts = synth.generate_case(0, "etz", "training_source", 0, 4, fov="head")
    assert image.GetSize()[:2] == (256, 256) and image.GetSpacing() == (0.8, 0.8, 1.5)
    assert facts["vs_volume_mm3"] > synth.LARGE_VS_MM3
    arr = sitk.GetArrayViewFromImage(image)
    assert arr[:, :8, :8].mean() < 0.1 * np.percentile(arr, 99), "air (noise only) outside the head"


def test_split_sizes_and_refusals(tmp_path):
    assert synth.split_sizes(8) == {"training_source": 3, "training_target": 3, "validation": 2}
    assert sum(synth.split_sizes(16).values()) == 16
    with pytest.raises(ValueError, match="at least 3"):
        synth.split_sizes(2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        synth.generate_cohort(tmp_path / "full", cases_per_centre=3, progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_held_out_test_split_with_truth_leaves_the_other_splits_unchanged(cohort, tmp_path):
    """``test/``: hrT2 only, in the 2022 layout, a truth label for each, numbered after validation;
    the training and validation cases are the same files as in a cohort without it."""
    out = tmp_path / "data"
    made = synth.generate_cohort(out, seed=0, cases_per_centre=6, test_cases_per_centre=2, progress=False)
    assert made["test_cases_per_centre"] == 2
    tests = sorted(p.name for p in (out / "test").iterdir())
    assert tests == ["crossmoda2021_ldn_311_hrT2.nii.gz", "crossmoda2021_ldn_312_hrT2.nii.gz", "crossmoda2022_etz_310_hrT2.nii.gz", "crossmoda2022_etz_311_hrT2.nii.gz"]
    for name in tests:
        image = sitk.ReadImage(str(out / "test" / name))
        truth = sitk.ReadImage(str(out / "synthetic_truth" / name.replace("_hrT2", "_hrT2_Label")))
        assert cio.geometry_mismatch(image, truth) is None
        values = set(np.unique(sitk.GetArrayViewFromImage(truth)))
        assert values == {0, 1, 2}, name  # a tumour and the cochleae in every test case
    # Every case draws from its own generator: the other splits are byte for byte the cohort without test/.
    for case in json.loads((cohort / "manifest.json").read_text())["cases"]:
        for key in ("image", "label"):
            assert (out / case[key]).read_bytes() == (cohort / case[key]).read_bytes(), case[key]
    test_cases = [c for c in made["cases"] if c["split"] == "test"]
    assert sorted(c["koos"] for c in test_cases if c["case"].startswith("crossmoda2021_ldn")) == [1, 4]  # the Koos cycle of every split
    # The layout validates with and without the optional split; an empty one is an error.
    assert not cio.validate_dataset(out).errors and not cio.validate_dataset(cohort).errors
    for name in tests:
        (out / "test" / name).unlink()
    assert any("test" in p.path and "empty split" in p.reason for p in cio.validate_dataset(out).errors)


def test_a_cohort_made_without_the_test_split_is_refused_when_one_is_asked(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    made = {"generator": "crossmoda_lib.synth", "generator_version": synth.GENERATOR_VERSION, "seed": 0, "cases_per_centre": 8, "fov": "roi"}
    (data / "manifest.json").write_text(json.dumps(made))  # a cohort of before the test split: none
    assert synth.ensure_cohort(data, 0, 8, "roi") == (data, False)
    with pytest.raises(cio.DataError, match=r"test_cases_per_centre 0 \(asked: 8\)"):
        synth.ensure_cohort(data, 0, 8, "roi", test_cases_per_centre=8)
    with pytest.raises(ValueError, match="test_cases_per_centre must be >= 0"):
        synth.generate_cohort(tmp_path / "neg", cases_per_centre=3, test_cases_per_centre=-1, progress=False)
