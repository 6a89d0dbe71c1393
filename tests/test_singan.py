"""SinGAN: the original pyramid arithmetic, per-scale training, reproducible generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossmoda_lib import singan as sg


def test_pyramid_matches_the_original_formulas():
    p = sg.pyramid_for(256, 256, sg.SinGANConfig(scale_factor=0.85, min_size=25, max_size=250))
    assert p.num_scales == 16 and p.stop_scale == 15 and p.n_scales == 16
    assert p.scale_factor == pytest.approx(0.8577, abs=1e-4)
    assert p.scale1 == pytest.approx(250 / 256)
    assert p.sizes[-1] == (250, 250) and p.sizes[0] == (25, 25)
    # min/max 25/256: no downscaling of the slice, 17 scales (the paper's N = 17 pyramid).
    p17 = sg.pyramid_for(256, 256, sg.SinGANConfig(scale_factor=0.85, min_size=25, max_size=256))
    assert p17.n_scales == 17 and p17.sizes[-1] == (256, 256)
    assert p17.scale_factor == pytest.approx((25 / 256) ** (1 / 16))
    # Sizes shrink by the effective factor, from an independent computation.
    for n, (h, _w) in enumerate(p17.sizes):
        assert h == math.ceil(256 * p17.scale_factor ** (16 - n) - 1e-6)
    # The number of scales made explicit (the paper profile's num_scales: 17) is the same pyramid;
    # 18 (the other reading of "N = 17") steps by (25 / 256) ** (1 / 17); an impossible count is refused.
    explicit = sg.pyramid_for(256, 256, sg.SinGANConfig(scale_factor=0.85, min_size=25, max_size=256, num_scales=17))
    assert explicit.sizes == p17.sizes and explicit.scale_factor == pytest.approx(p17.scale_factor)
    p18 = sg.pyramid_for(256, 256, sg.SinGANConfig(scale_factor=0.85, min_size=25, max_size=256, num_scales=18))
    assert p18.n_scales == 18 and p18.sizes[0] == (25, 25) and p18.sizes[-1] == (256, 256)
    assert p18.scale_factor == pytest.approx((25 / 256) ** (1 / 17))
    with pytest.raises(ValueError, match="num_scales 8 .* too far from scale_factor 0.85"):
        sg.pyramid_for(256, 256, sg.SinGANConfig(scale_factor=0.85, min_size=25, max_size=256, num_scales=8))
    # Non-square slice: the short side sets the number of scales, the long side max_size.
    pr = sg.pyramid_for(144, 176, sg.SinGANConfig(scale_factor=0.75, min_size=20, max_size=88))
    assert pr.sizes[-1] == (72, 88) and min(pr.sizes[0]) == 20


def test_generator_padding_channels_and_residual():
    cfg = sg.SinGANConfig(ker_size=5, num_layer=5)
    assert cfg.pad == 10
    g = sg.Generator(32, cfg)
    prev = torch.randn(1, 1, 45, 50)
    out = g(torch.zeros(1, 1, 45, 50), prev)
    assert out.shape == (1, 1, 25, 30)  # padded input minus 5 valid 5x5 convolutions
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(c.padding == (0, 0) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules()) == 4
    assert [sg.nfc_at(n, sg.SinGANConfig()) for n in (0, 3, 4, 8, 12, 16)] == [32, 32, 64, 128, 128, 128]
    # The output is the cropped previous image plus a residual in (-1, 1).
    residual = out - prev[:, :, 10:35, 10:40]
    assert residual.abs().max() < 1


def test_gradient_penalty_of_a_linear_critic():
    """A critic with slope 3 everywhere: penalty = weight * (3 - 1)^2, independently of the inputs."""

    class Linear(torch.nn.Module):
        def forward(self, x):
            return 3.0 * x

    gen = torch.Generator().manual_seed(0)
    gp = sg.gradient_penalty(Linear(), torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6), 0.1, gen)
    assert float(gp) == pytest.approx(0.1 * 4.0)


def _image() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 48), indexing="ij")
    return (0.6 * torch.sin(7 * xx) * torch.cos(5 * yy) + 0.2 * (xx > 0.3)).clamp(-1, 1)[None, None]


SMALL = sg.SinGANConfig(scale_factor=0.7, min_size=16, max_size=48, ker_size=3, nfc=8, max_nfc=16, niter=40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("singan")
    model, histories = sg.train_singan(_image(), SMALL, out, progress=False)
    return out, model, histories


def test_training_lowers_the_reconstruction_loss_at_each_scale(trained):
    _, model, histories = trained
    assert model.n_trained == model.pyramid.n_scales == len(histories) >= 3
    for history in histories:
        assert np.mean(history["rec"][-5:]) < np.mean(history["rec"][:5])
    # The coarsest scale reconstructs the downsampled image far better than noise of its spread.
    real0 = model.reals[0]
    rec0 = sg.reconstruct(model, upto=1)
    assert float(((rec0 - real0) ** 2).mean()) < 0.25 * float(real0.var() * 2)
    assert float(((sg.reconstruct(model) - model.reals[-1]) ** 2).mean()) < 0.05
    # Noise amplitude above scale 0 is 0.1 x RMSE of the upsampled reconstruction.
    assert model.noise_amps[0] == 1.0 and all(0 < a < 0.1 for a in model.noise_amps[1:])


def test_generation_is_seeded_and_resumable(trained, tmp_path):
    out, model, _ = trained
    a, b, c = sg.sample(model, 3), sg.sample(model, 3), sg.sample(model, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape[-2:] == model.pyramid.sizes[-1]
    ref = torch.zeros(1, 1, *model.pyramid.sizes[-1])
    assert torch.equal(sg.harmonize(model, ref, 1, 7), sg.harmonize(model, ref, 1, 7))
    with pytest.raises(ValueError, match="outside"):
        sg.harmonize(model, ref, model.pyramid.n_scales, 0)
    # A run stopped after scale 1 resumes at scale 2 and ends with the same generators.
    sg.train_singan(_image(), SMALL, tmp_path, progress=False, stop_after_scale=1)
    assert sorted(p.name for p in tmp_path.glob("scale_*.pt")) == ["scale_00.pt", "scale_01.pt"]
    resumed, _ = sg.train_singan(_image(), SMALL, tmp_path, progress=False)
    for g1, g2 in zip(model.generators, resumed.generators):
        for k, v in g1.state_dict().items():
            assert torch.equal(v, g2.state_dict()[k]), k
    loaded = sg.load_singan(out, _image(), SMALL)
    assert torch.equal(sg.sample(loaded, 3), a)
