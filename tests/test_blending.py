"""Tumour blending: the paper's selection rules in mm3, untouched voxels, seeds, lambda."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from crossmoda_lib import blending as bl
from crossmoda_lib import singan as sg


def _cohort_table() -> pd.DataFrame:
    """Constructed cases on both sides of every threshold (volumes in mm3, stds on [0, 1])."""
    rows = [
        ("crossmoda2022_etz_1", "Tilburg", 2400.0, 0.10),  # large, heterogeneous, Tilburg -> large rule
        ("crossmoda2022_etz_2", "Tilburg", 2400.0, 0.08),  # large but homogeneous -> none
        ("crossmoda2022_etz_3", "Tilburg", 2300.0, 0.20),  # just below 2340 -> none
        ("crossmoda2021_ldn_4", "London", 5000.0, 0.30),  # large heterogeneous but London -> none
        ("crossmoda2021_ldn_5", "London", 287.0, 0.01),  # small -> small rule
        ("crossmoda2022_etz_6", "Tilburg", 289.0, 0.01),  # just above 288 -> none
        ("crossmoda2022_etz_7", "Tilburg", 100.0, 0.15),  # small (any centre) -> small rule
        ("crossmoda2021_ldn_8", "London", 0.0, 0.0),  # no VS (operated) -> none
    ]
    return pd.DataFrame([{"case": c, "centre": ctr, "vs_volume_mm3": v, "vs_std": s, "cochlea_volume_mm3": 90.0, "cochlea_std": 0.05} for c, ctr, v, s in rows])


def test_paper_rules_select_exactly_the_expected_cases():
    selected = bl.select(_cohort_table(), bl.PAPER_RULES)
    vs = selected[selected.structure == "vs"]
    assert dict(zip(vs.case, vs.rule)) == {"crossmoda2022_etz_1": "vs_large_heterogeneous", "crossmoda2021_ldn_5": "vs_small", "crossmoda2022_etz_7": "vs_small"}
    assert set(selected[selected.structure == "cochlea"].case) == set(_cohort_table().case)
    jobs = bl.plan(selected, bl.PAPER_RULES, seed=0)
    per_rule = pd.Series([row["rule"] for row, _ in jobs]).value_counts().to_dict()
    assert per_rule == {"cochlea": 8 * 3, "vs_small": 2 * 3 * 2, "vs_large_heterogeneous": 1 * 3 * 2}
    assert sorted({p.lam for row, p in jobs if row["rule"] == "vs_large_heterogeneous"}) == [0.7, 1.2, 1.5]
    assert {p.start_scale for row, p in jobs if row["rule"] == "cochlea"} == {13}
    assert [p.seed for _, p in jobs] == [p.seed for _, p in bl.plan(selected, bl.PAPER_RULES, seed=0)]


def test_volumes_come_from_the_spacing():
    """2340 mm3 are 6500 voxels of 0.36 mm3 (the paper's count), but 10833 voxels of 0.6x0.6x0.6 mm."""
    lab = np.zeros((30, 40, 40), dtype=np.uint8)
    lab.reshape(-1)[:10834] = 1
    label = sitk.GetImageFromArray(lab)
    label.SetSpacing((0.6, 0.6, 0.6))
    image = sitk.GetImageFromArray(np.random.default_rng(0).random(lab.shape).astype(np.float32))
    image.CopyInformation(label)
    stats = bl.roi_statistics(image, label)
    assert stats["vs_volume_mm3"] == pytest.approx(10834 * 0.216)
    assert stats["vs_volume_mm3"] > 2340 and 10834 * 0.36 > 2340
    label.SetSpacing((0.6, 0.6, 1.0))
    assert bl.roi_statistics(image, label)["vs_volume_mm3"] == pytest.approx(10834 * 0.36)
    assert stats["vs_std"] == pytest.approx(np.sqrt(1 / 12), abs=0.01)  # uniform [0, 1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 48), indexing="ij")
    image = (0.5 * torch.sin(6 * xx) * torch.cos(4 * yy))[None, None]
    cfg = sg.SinGANConfig(scale_factor=0.7, min_size=16, max_size=48, ker_size=3, nfc=8, max_nfc=8, niter=15)
    trained, _ = sg.train_singan(image, cfg, tmp_path_factory.mktemp("singan"), progress=False)
    return trained


def _volume(shape=(6, 40, 48)) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(0)
    arr = np.clip(0.4 + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    lab = np.zeros(arr.shape, dtype=np.uint8)
    cy, cx = shape[1] // 2, shape[2] // 2
    lab[2:4, cy - 3 : cy + 3, cx - 3 : cx + 4] = 1
    lab[1:5, cy + 10 : cy + 13, 5:8] = 2
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.6, 0.6, 1.0))
    image.SetOrigin((3.0, -2.0, 7.0))
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(image)
    return image, label


def test_voxels_outside_the_blending_weight_are_bit_identical(model):
    """A 96 x 112 slice blended on the SinGAN's 40 x 48 grid (scale 0.43): pixels farther from the VS
    than the mask's reach (disk 2 + 4 sigma of 1, in SinGAN pixels, plus interpolation) are copied
    bit for bit; so is every slice without the VS."""
    from scipy import ndimage

    image, label = _volume((6, 96, 112))
    params = bl.BlendParams("vs", 1.5, 2, seed=11, dilation_px=2, blur_sigma_px=1.0)
    out = bl.blend_volume(image, label, params, model)
    assert out.GetOrigin() == image.GetOrigin() and out.GetSpacing() == image.GetSpacing()
    a, b = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(out)
    lab = sitk.GetArrayFromImage(label)
    assert np.array_equal(a[[0, 1, 4, 5]], b[[0, 1, 4, 5]])
    reach = (2 + 4 * 1.0 + 2) * 112 / 48
    for z in (2, 3):
        far = ndimage.distance_transform_edt(lab[z] != 1) > reach
        assert far.mean() > 0.7
        assert np.array_equal(a[z][far], b[z][far])
        assert not np.array_equal(a[z][lab[z] == 1], b[z][lab[z] == 1])
        # And exactly where the library's own weight is 0.
        _, _, m = bl.harmonize_slice(model, a[z], lab[z] == 1, bl.BlendParams("vs", 1.5, 2, bl.slice_seed(11, z), 2, 1.0))
        assert (m == 0).any() and np.array_equal(a[z][m == 0], b[z][m == 0])
    assert np.array_equal(bl.blend_mask(np.zeros((5, 5), bool), 7, 5.0), np.zeros((5, 5)))


def test_same_seed_same_output_and_lambda_moves_the_roi(model):
    image, label = _volume()
    one = sitk.GetArrayFromImage(bl.blend_volume(image, label, bl.BlendParams("cochlea", 3.0, 2, seed=5), model))
    two = sitk.GetArrayFromImage(bl.blend_volume(image, label, bl.BlendParams("cochlea", 3.0, 2, seed=5), model))
    other = sitk.GetArrayFromImage(bl.blend_volume(image, label, bl.BlendParams("cochlea", 3.0, 2, seed=6), model))
    assert np.array_equal(one, two) and not np.array_equal(one, other)
    a = sitk.GetArrayFromImage(image)
    roi = sitk.GetArrayFromImage(label) == 1
    shifts = []
    for lam in (1.0, 1.3, 1.8):
        out = sitk.GetArrayFromImage(bl.blend_volume(image, label, bl.BlendParams("vs", lam, 2, seed=1), model))
        shifts.append(out[roi].mean() - a[roi].mean())
    assert shifts[0] < shifts[1] < shifts[2] and shifts[2] > 0.1


def test_random_blending_records_what_it_drew(model):
    image, label = _volume()
    aug = bl.RandomTumourBlending(model, "vs", (0.6, 1.5), (1, 2), rng=np.random.default_rng(3))
    out = aug(image, label)
    drawn = aug.last
    assert 0.6 <= drawn.lam <= 1.5 and drawn.start_scale in (1, 2)
    replay = bl.blend_volume(image, label, drawn, model)
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(replay))


def test_rules_refuse_bad_settings():
    with pytest.raises(ValueError, match="structure"):
        bl.BlendRule("x", "brain", (1.0,), (1,))
    rule = bl.BlendRule.from_dict({"name": "c", "structure": "cochlea", "lambdas": [2, 3], "start_scales": [13]})
    assert rule.lambdas == (2, 3) and rule.centres == ("London", "Tilburg")


def test_structure_levels_against_hand_values():
    """A 0.5 structure in a 0.1 surround, CSF at 1.0 filling 5 % of the volume (so it sets the 99th
    percentile): level 0.5 and contrast 0.4; halving the whole image changes neither."""
    image = np.full((20, 20, 20), 0.1, dtype=np.float32)
    image[:1] = 1.0  # 400 of 8000 voxels
    mask = np.zeros(image.shape, bool)
    mask[8:12, 8:12, 8:12] = True
    image[mask] = 0.5
    levels = bl.structure_levels(image, mask)
    assert levels == pytest.approx({"level": 0.5, "contrast": 0.4})
    assert bl.structure_levels(image / 2, mask) == pytest.approx(levels)
    assert bl.structure_levels(image / 2, mask, scale=1.0) == pytest.approx({"level": 0.25, "contrast": 0.2})  # image units
    for face in (
        (7, slice(8, 12), slice(8, 12)),
        (12, slice(8, 12), slice(8, 12)),
        (slice(8, 12), 7, slice(8, 12)),
        (slice(8, 12), 12, slice(8, 12)),
        (slice(8, 12), slice(8, 12), 7),
        (slice(8, 12), slice(8, 12), 12),
    ):
        image[face] = 0.9  # the voxels touching a face (partial volume) are not part of the shell
    assert bl.structure_levels(image, mask)["contrast"] == pytest.approx(0.4)
    assert np.isnan(bl.structure_levels(image, np.zeros(image.shape, bool))["level"])


def test_a_rerun_of_stage05_replaces_its_volumes(model, tmp_path):
    """Stage 05 run again with other lambdas leaves only its own volumes, and segmentation trains on
    exactly those; the level table shows the cochlea brightened by the larger lambda."""
    from crossmoda_lib import io as cio
    from crossmoda_lib import segmentation as seg

    image, label = _volume()
    for sub in ("pseudo_hrT2", "pseudo_hrT2_vc"):
        cio.write_image(image, tmp_path / "03" / sub / "crossmoda2021_ldn_1_pseudoT2.nii.gz")
        cio.write_image(label, tmp_path / "03" / sub / "crossmoda2021_ldn_1_Label.nii.gz")
    stage05 = tmp_path / "05"
    levels = {}
    for lam in (2.0, 3.0):
        rules = (bl.BlendRule("cochlea", "cochlea", (lam,), (2,)),)
        table = bl.blend_stage(tmp_path / "03", model, stage05, rules, seed=0, dilation_px=2, blur_sigma_px=1.0, progress=False)
        pairs = seg.training_pairs(tmp_path / "03", stage05, "cochlea", ["augmented"])
        assert [p.image.name for p in pairs] == [f"crossmoda2021_ldn_1_cochlea_l{lam:g}_n2_pseudoT2.nii.gz"]
        assert sorted(f.name for f in (stage05 / "augmented").iterdir()) == sorted([pairs[0].image.name, pairs[0].label.name])
        levels[lam] = bl.level_table(stage05, tmp_path / "03", table).iloc[0]
    assert levels[2.0].level_before == levels[3.0].level_before
    assert levels[2.0].level_before < levels[2.0].level_after < levels[3.0].level_after
    (stage05 / "augmentations.csv").unlink()
    with pytest.raises(cio.DataError, match="augmentations.csv"):
        seg.training_pairs(tmp_path / "03", stage05, "cochlea", ["augmented"])
