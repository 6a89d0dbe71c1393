"""CycleGAN: architecture as the original, training lowers the cycle loss, exact resumption,
translation keeps geometry and labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from crossmoda_lib import io as cio
from crossmoda_lib import translation as tr


def test_generator_shapes_and_size_at_the_paper_setting():
    g = tr.ResnetGenerator(1, 1, ngf=64, n_blocks=9)
    x = torch.rand(2, 1, 256, 256) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1.0  # tanh output
    # The original's parameter count for a 1-channel ResNet-9 generator with ngf 64.
    assert sum(p.numel() for p in g.parameters()) == 11_365_633
    blocks = [m for m in g.modules() if isinstance(m, tr.ResnetBlock)]
    assert len(blocks) == 9
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in g.modules()) == 2 + 2 * 9
    assert all(not m.affine for m in g.modules() if isinstance(m, nn.InstanceNorm2d))
    # Non-square slices (the demo's 144 x 176) keep their shape.
    assert tr.ResnetGenerator(1, 1, 8, 2)(torch.zeros(1, 1, 144, 176)).shape == (1, 1, 144, 176)


def test_patchgan_output_and_70px_receptive_field():
    d = tr.PatchDiscriminator(1, ndf=64, n_layers=3)
    assert d(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 30, 30)
    assert tr.receptive_field(d) == 70
    assert tr.receptive_field(tr.PatchDiscriminator(1, 64, n_layers=1)) == 16
    # Empirically: one output's gradient reaches exactly a 70 x 70 input patch. Instance norm mixes the
    # whole image, so it is replaced by identity for this measurement.
    for name, module in list(d.model.named_children()):
        if isinstance(module, nn.InstanceNorm2d):
            d.model._modules[name] = nn.Identity()
    x = torch.randn(1, 1, 128, 128, requires_grad=True)
    d(x)[0, 0, 6, 6].backward()
    rows, cols = torch.nonzero(x.grad[0, 0]).unbind(1)
    assert int(rows.max() - rows.min() + 1) == 70 and int(cols.max() - cols.min() + 1) == 70


def test_lr_rule_is_the_original_linear_decay():
    cfg = tr.CycleGANConfig(n_epochs=100, n_epochs_decay=100)
    factors = [tr.lr_factor(e, cfg) for e in range(200)]
    assert factors[0] == factors[99] == 1.0  # 100 epochs at the initial rate
    assert factors[100] == pytest.approx(1 - 1 / 101)
    assert factors[199] == pytest.approx(1 / 101)
    assert np.all(np.diff(factors[99:]) < 0)


def test_image_pool_behaviour():
    pool = tr.ImagePool(3, seed=0)
    first = [pool.query(torch.full((1, 1, 2, 2), float(i))) for i in range(3)]
    assert [int(t[0, 0, 0, 0]) for t in first] == [0, 1, 2]  # filling: returns the new image
    returned = [int(pool.query(torch.full((1, 1, 2, 2), 10.0 + i))[0, 0, 0, 0]) for i in range(200)]
    old = sum(r < 10 or r != 10 + k for k, r in enumerate(returned))
    assert 60 < old < 140  # about half the time an older image comes back
    assert len(pool.images) == 3
    assert tr.ImagePool(0, 0).query(torch.ones(1, 1, 2, 2)).sum() == 4


def _toy_domains() -> tuple[torch.Tensor, torch.Tensor]:
    """Unpaired 32 x 32 slices: bright discs on grey (A) and dark discs on grey (B), in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")

    def discs(n: int, inside: float) -> torch.Tensor:
        out = []
        for _ in range(n):
            c = torch.rand(2, generator=g) - 0.5
            r = 0.2 + 0.2 * torch.rand(1, generator=g)
            m = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r**2).float()
            out.append((0.3 + (inside - 0.3) * m)[None])
        return torch.stack(out) * 2 - 1

    return discs(16, 0.9), discs(16, 0.1)


TOY = tr.CycleGANConfig(ngf=8, ndf=8, n_blocks=1, n_epochs=6, n_epochs_decay=4, log_every=16, checkpoint_every=7, pool_size=4)


def test_short_training_lowers_the_cycle_loss(tmp_path):
    a, b = _toy_domains()
    _, history = tr.train_cyclegan(a, b, TOY, tmp_path, progress=False)
    assert len(history) == 10 and list(history.iteration) == list(range(16, 161, 16))
    first, last = history.iloc[0], history.iloc[-1]
    assert last.cycle_A < 0.5 * first.cycle_A and last.cycle_B < 0.5 * first.cycle_B
    assert history.lr.iloc[0] == pytest.approx(2e-4) and history.lr.iloc[-1] < 2e-4
    saved = pd.read_csv(tmp_path / "losses.csv")
    assert list(saved.columns[:3]) == ["iteration", "epoch", "lr"] and len(saved) == 10


def test_resume_equals_an_uninterrupted_run(tmp_path):
    a, b = _toy_domains()
    nets, history = tr.train_cyclegan(a, b, TOY, tmp_path / "straight", progress=False)
    # Interrupted mid-epoch (iteration 37 is not a checkpoint multiple), then resumed.
    tr.train_cyclegan(a, b, TOY, tmp_path / "resumed", stop_after=37, progress=False)
    partial = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert partial["state"].iteration == 37 and not partial["state"].finished
    resumed, history2 = tr.train_cyclegan(a, b, TOY, tmp_path / "resumed", progress=False)
    for name in ("G_A", "G_B", "D_A", "D_B"):
        for key, value in getattr(nets, name).state_dict().items():
            assert torch.equal(value, getattr(resumed, name).state_dict()[key]), (name, key)
    pd.testing.assert_frame_equal(history, history2)
    # A finished run is reused, not retrained; other settings are refused.
    again, _ = tr.train_cyclegan(a, b, TOY, tmp_path / "straight", progress=False)
    assert torch.equal(next(iter(again.G_A.parameters())), next(iter(nets.G_A.parameters())))
    with pytest.raises(ValueError, match="other settings"):
        tr.train_cyclegan(a, b, tr.CycleGANConfig(**{**TOY.as_dict(), "ngf": 4, "image_size": None}), tmp_path / "straight", progress=False)


def test_intensity_mapping_is_invertible():
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(tr.from_network(tr.to_network(x)), x)
    assert tr.to_network(torch.zeros(1)).item() == -1.0 and tr.to_network(torch.ones(1)).item() == 1.0


def test_config_refuses_sizes_the_generator_cannot_restore():
    with pytest.raises(ValueError, match="multiples of 4"):
        tr.CycleGANConfig(image_size=(100, 102))


def test_translation_keeps_geometry_and_labels(tmp_path):
    """A volume on an oblique-free London-like grid (flipped axes, 0.6 x 0.6 x 1.0 mm)."""
    arr = np.random.default_rng(0).random((7, 40, 48)).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.6, 0.6, 1.0))
    image.SetOrigin((12.5, -3.25, 40.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    generator = tr.ResnetGenerator(1, 1, 4, 1).eval()
    out = tr.translate_image(generator, image, (24, 32), batch_size=3)
    assert cio.geometry_mismatch(out, image) is None
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    o = sitk.GetArrayFromImage(out)
    assert o.shape == arr.shape and o.min() >= 0 and o.max() <= 1
    # Slice-wise and batch-independent: translating slice 5 alone gives the same slice.
    single = tr.translate_array(generator, arr[5:6], (24, 32))
    np.testing.assert_allclose(single[0], o[5], atol=1e-6)


def test_translate_stage_copies_labels_unchanged(cohort, tmp_path):
    from crossmoda_lib import preprocess as pp

    stage01 = tmp_path / "01"
    pp.preprocess_dataset(cohort, stage01, pp.PreprocessConfig(crop_size=(96, 80)), progress=False)
    cfg = tr.CycleGANConfig(ngf=4, ndf=4, n_blocks=1, n_epochs=1, n_epochs_decay=0, image_size=(40, 48), log_every=5)
    tr.train_stage(stage01, tmp_path / "02", cfg, ["London"], stop_after=None, progress=False)
    table = tr.translate_stage(stage01, tmp_path / "02" / "checkpoint.pt", tmp_path / "03", progress=False)
    assert set(table.centre) == {"London", "Tilburg"} and len(table) == 6
    for case in table.case:
        source = sitk.ReadImage(str(stage01 / "source" / f"{case}_ceT1.nii.gz"))
        pseudo = sitk.ReadImage(str(tmp_path / "03" / f"{case}_pseudoT2.nii.gz"))
        assert cio.geometry_mismatch(source, pseudo) is None
        assert (tmp_path / "03" / f"{case}_Label.nii.gz").read_bytes() == (stage01 / "source" / f"{case}_Label.nii.gz").read_bytes()
    with pytest.raises(cio.DataError, match="run notebooks/01_preprocess.ipynb first"):
        tr.train_stage(tmp_path / "nothing", tmp_path / "x", cfg, ["London"])


def test_random_crops_are_windows_of_the_slice_and_translation_stays_whole(tmp_path):
    x = torch.arange(2 * 40 * 52, dtype=torch.float32).reshape(2, 1, 40, 52)
    g = torch.Generator().manual_seed(0)
    corners = set()
    for _ in range(30):
        crop = tr._crop(x, g, 16)
        assert crop.shape == (2, 1, 16, 16)
        top, left = divmod(int(crop[0, 0, 0, 0]), 52)
        assert torch.equal(crop, x[..., top : top + 16, left : left + 16])  # one window for the batch
        corners.add((top, left))
    assert len(corners) > 20 and max(t for t, _ in corners) <= 24 and max(c for _, c in corners) <= 36
    assert tr._crop(x, g, None) is x
    with pytest.raises(ValueError, match="random_crop"):
        tr.CycleGANConfig(random_crop=18)
    with pytest.raises(ValueError, match="at least 24"):
        tr.CycleGANConfig(random_crop=20, n_layers_d=3)
    # Training on 24 x 24 crops of 32 x 32 slices still lowers the cycle loss (the crop
    # windows come from the checkpointed sampler, so resumption stays exact); the
    # fully convolutional generators translate whole slices.
    a, b = _toy_domains()
    cfg = tr.CycleGANConfig(**{**TOY.as_dict(), "image_size": None, "random_crop": 24})
    nets, history = tr.train_cyclegan(a, b, cfg, tmp_path / "straight", progress=False)
    assert history.cycle_A.iloc[-1] < 0.7 * history.cycle_A.iloc[0]
    with torch.no_grad():
        assert nets.G_A.eval()(a[:2]).shape == a[:2].shape


def test_whole_slices_come_first_then_the_crops(tmp_path, monkeypatch):
    """``whole_epochs``: whole slices for the first epochs, random crops after; resumption across the
    switch is exact; with every epoch whole the crops never happen (the same networks as no crop)."""
    a, b = _toy_domains()  # 16 slices per epoch (batch 1)
    base = {**TOY.as_dict(), "image_size": None, "random_crop": 24, "n_epochs": 2, "n_epochs_decay": 1}
    seen = []
    real_step = tr.train_step

    def recording(nets, real_a, real_b, *rest):
        seen.append((tuple(real_a.shape[-2:]), tuple(real_b.shape[-2:])))
        return real_step(nets, real_a, real_b, *rest)

    monkeypatch.setattr(tr, "train_step", recording)
    cfg = tr.CycleGANConfig(**{**base, "whole_epochs": 1})
    straight, _ = tr.train_cyclegan(a, b, cfg, tmp_path / "straight", progress=False)
    assert seen == [((32, 32), (32, 32))] * 16 + [((24, 24), (24, 24))] * 32
    tr.train_cyclegan(a, b, cfg, tmp_path / "resumed", stop_after=11, progress=False)  # inside the whole epoch
    resumed, _ = tr.train_cyclegan(a, b, cfg, tmp_path / "resumed", progress=False)
    for key, value in straight.G_A.state_dict().items():
        assert torch.equal(value, resumed.G_A.state_dict()[key]), key
    every = tr.CycleGANConfig(**{**base, "whole_epochs": 3})
    uncropped = tr.CycleGANConfig(**{**base, "random_crop": None})
    g1, _ = tr.train_cyclegan(a, b, every, tmp_path / "every", progress=False)
    g2, _ = tr.train_cyclegan(a, b, uncropped, tmp_path / "uncropped", progress=False)
    for key, value in g1.G_A.state_dict().items():
        assert torch.equal(value, g2.G_A.state_dict()[key]), key
    with pytest.raises(ValueError, match="whole_epochs"):
        tr.CycleGANConfig(**{**base, "whole_epochs": 4})
    # A checkpoint written before the setting existed resumes as crops from the start.
    old = tr.CycleGANConfig(**{**base, "whole_epochs": 0})
    tr.train_cyclegan(a, b, old, tmp_path / "old", stop_after=5, progress=False)
    saved = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    del saved["config"]["whole_epochs"]
    torch.save(saved, tmp_path / "old" / "checkpoint.pt")
    tr.train_cyclegan(a, b, old, tmp_path / "old", progress=False)
    assert tr.CycleGANConfig.from_dict({k: v for k, v in old.as_dict().items() if k != "whole_epochs"}) == old


def test_settings_survive_their_json_form():
    import json

    for cfg in (TOY, tr.CycleGANConfig(**{**TOY.as_dict(), "image_size": None})):
        assert tr.CycleGANConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg


def _tumour_in_csf(tumour: float, csf: float, parenchyma: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A (Z, Y, X) = (20, 40, 40) volume at 1.0 x 0.5 x 0.5 mm: a ball of radius 3 mm (the VS) at
    ``tumour``, in a ball of CSF of radius 8 mm, in parenchyma."""
    z, y, x = np.meshgrid(np.arange(20) * 1.0, np.arange(40) * 0.5, np.arange(40) * 0.5, indexing="ij")
    r = np.sqrt((z - 10.0) ** 2 + (y - 10.0) ** 2 + (x - 10.0) ** 2)
    image = np.full(r.shape, parenchyma, np.float32)
    image[r <= 8.0] = csf
    vs = r <= 3.0
    image[vs] = tumour
    return image, vs


def test_vs_measures_against_their_formulas_and_the_failures_seen():
    # hrT2-like: the ring 1-4 mm around the tumour is all CSF (radius <= 7 mm < 8 mm), so the 90th
    # percentile of the ring is the CSF, the median inside is the tumour, the 99th percentile of the
    # volume is the CSF: contrast (1.0 - 0.5) / 1.0; the band |x - 0.5| < 0.25 is the tumour: Dice 1.
    image, vs = _tumour_in_csf(0.5, 1.0)
    got = tr.vs_measures(image, vs, (1.0, 0.5, 0.5))
    assert got["vs_csf_contrast"] == pytest.approx(0.5) and got["vs_level"] == pytest.approx(0.5) and got["vs_band_dice"] == 1.0
    # Caught near the identity mapping (ceT1: an enhancing tumour in dark CSF): negative, no band.
    image, vs = _tumour_in_csf(1.0, 0.1)
    got = tr.vs_measures(image, vs, (1.0, 0.5, 0.5))
    assert got["vs_csf_contrast"] == pytest.approx(0.1 - 1.0) and got["vs_band_dice"] == 0.0
    # The tumour painted as CSF: no contrast, no band.
    image, vs = _tumour_in_csf(1.0, 1.0)
    got = tr.vs_measures(image, vs, (1.0, 0.5, 0.5))
    assert got["vs_csf_contrast"] == pytest.approx(0.0) and got["vs_band_dice"] == 0.0
    # Broken into pieces: a fraction f < 1/2 of the tumour as dark as air. The median stays 0.5, the
    # band holds the rest of the tumour: Dice 2 (1 - f) n / ((1 - f) n + n) = 2 (1 - f) / (2 - f).
    image, vs = _tumour_in_csf(0.5, 1.0)
    dark = vs & (np.arange(40)[None, None, :] < 18)
    image[dark] = 0.0
    f = dark.sum() / vs.sum()
    assert 0.1 < f < 0.5
    assert tr.vs_measures(image, vs, (1.0, 0.5, 0.5))["vs_band_dice"] == pytest.approx(2 * (1 - f) / (2 - f))
    # The ring is in mm of the given spacing. With the 0th percentile the score reads the ring's
    # darkest voxel: CSF (0.5 above the tumour) while the ring stays inside the CSF ball (5 voxels
    # thick through-plane, 10 in-plane), parenchyma (0.2 below it) once it reaches past it. Read
    # at 0.5 mm through-plane, 1-4 mm is 2-8 voxels there: past the ball.
    image, vs = _tumour_in_csf(0.5, 1.0)
    ring = lambda spacing: tr.vs_measures(image, vs, spacing, csf_percentile=0.0)["vs_csf_contrast"]  # noqa: E731 - darkest ring voxel
    assert ring((1.0, 0.5, 0.5)) == pytest.approx(0.5) and ring((3.0, 0.5, 0.5)) == pytest.approx(0.5)
    assert ring((0.5, 3.0, 3.0)) == pytest.approx(0.3 - 0.5)
    assert all(np.isnan(v) for v in tr.vs_measures(image, np.zeros_like(vs), (1.0, 0.5, 0.5)).values())


def test_the_draw_gate_screens_every_draw_and_trains_the_best_to_the_end(cohort, tmp_path):
    """draws > 1: each draw trains draw_epochs epochs and is scored on the source volumes; the one
    with the highest criterion trains on, and the stage's CycleGAN is exactly the one that a single
    training with that draw's seed gives. A second call trains nothing."""
    import json

    from crossmoda_lib import preprocess as pp

    stage01 = tmp_path / "01"
    pp.preprocess_dataset(cohort, stage01, pp.PreprocessConfig(crop_size=(96, 80)), progress=False)
    cfg = tr.CycleGANConfig(ngf=4, ndf=4, n_blocks=1, n_epochs=1, n_epochs_decay=1, image_size=(24, 32), log_every=5, draws=2, draw_epochs=1)
    _, _, summary = tr.train_stage(stage01, tmp_path / "02", cfg, ["London"], progress=False)
    table = pd.read_csv(tmp_path / "02" / "draws.csv")
    assert list(table.columns) == list(tr.DRAW_COLUMNS) and list(table.draw) == [0, 1] and list(table.seed) == [0, 1000]
    assert table.chosen.sum() == 1 and table.loc[table.chosen, "vs_band_dice"].iloc[0] == table.vs_band_dice.max()
    assert (table.cases == 6).all() and (table.iterations == table.iterations.iloc[0]).all()
    best = int(table.loc[table.chosen, "draw"].iloc[0])
    assert summary["draw"] == best and summary["draw_seed"] == 1000 * best
    manifest = json.loads((tmp_path / "02" / "manifest.json").read_text())
    assert manifest["draw"] == best and manifest["settings"]["draws"] == 2
    # The criterion of the screen is the one of the draw's generator at that point: recompute it
    # for a draw that was not chosen (its folder holds the screened checkpoint).
    other = 1 - best
    saved = torch.load(tmp_path / "02" / "draws" / f"draw_{other}" / "checkpoint.pt", weights_only=False)
    generator = tr.ResnetGenerator(1, 1, 4, 1)
    generator.load_state_dict(saved["nets"]["G_A"])
    sources = tr.stage_volumes(stage01, "source", "ceT1", ["London", "Tilburg"])
    again = tr.source_translation_scores(generator, cfg.image_size, sources)
    assert again["vs_band_dice"] == pytest.approx(float(table.vs_band_dice[other]), abs=1e-6)
    # The stage's checkpoint equals one CycleGAN trained straight with the chosen seed.
    straight_cfg = tr.CycleGANConfig(**{**cfg.as_dict(), "image_size": (24, 32), "seed": 1000 * best, "draws": 1, "draw_epochs": 0})
    tr.train_stage(stage01, tmp_path / "straight", straight_cfg, ["London"], progress=False)
    gated = tr.load_generators(tmp_path / "02" / "checkpoint.pt")[0].state_dict()
    straight = tr.load_generators(tmp_path / "straight" / "checkpoint.pt")[0].state_dict()
    assert all(torch.equal(gated[k], straight[k]) for k in gated)
    # Rerun: the screen is read back, nothing trains again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "02").rglob("checkpoint.pt")}
    tr.train_stage(stage01, tmp_path / "02", cfg, ["London"], progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "02").rglob("checkpoint.pt")} == stamps
    # Other gate settings on the same folder are refused, naming the file.
    with pytest.raises(ValueError, match="draws.csv: made with other settings"):
        tr.train_stage(stage01, tmp_path / "02", tr.CycleGANConfig(**{**cfg.as_dict(), "image_size": (24, 32), "draws": 3}), ["London"], progress=False)


def test_draw_gate_settings_are_checked():
    with pytest.raises(ValueError, match="draws must be >= 1"):
        tr.CycleGANConfig(draws=0)
    with pytest.raises(ValueError, match="draw_epochs must be between 1 and the 3 epochs"):
        tr.CycleGANConfig(n_epochs=1, n_epochs_decay=2, draws=2, draw_epochs=4)
    assert tr.CycleGANConfig(seed=7, draws=3, draw_epochs=1).draw(2).seed == 2007
