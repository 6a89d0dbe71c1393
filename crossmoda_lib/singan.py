"""Stage 04: SinGAN, a multi-scale GAN trained on ONE image (Shaham et al., ICCV 2019).

Written here, not imported, because the original code (tamarott/SinGAN) crashes on PyTorch >= 1.5,
quantises to 8 bits at every resize and assumes 3-channel images, and LaTIM's changes were never
published. This version follows the original's formulas and training loop, with these documented
differences:

* float intensities throughout (no 8-bit round trip), one channel, images in [-1, 1];
* the generator loss recomputes the fake inside each of the 3 generator steps (the original reuses
  the fake of the discriminator steps, whose graph is freed after the optimiser step);
* the coarsest scale's reconstruction noise z* is drawn once and kept fixed (the original redraws it
  every iteration and keeps the last draw);
* resizing is bicubic with antialiasing (``torch.nn.functional.interpolate``) straight to each
  scale's size (the original's MATLAB-style ``imresize`` by a factor, then a crop).

Pyramid (original ``adjust_scales2image``)::

    num_scales = ceil(log(min_size / min(H, W)) / log(sf)) + 1
    stop_scale = num_scales - ceil(log(min(max_size, max(H, W)) / max(H, W)) / log(sf))
    the image is resized by min(max_size / max(H, W), 1), then sf_eff = (min_size / min(h, w)) ** (1 / stop_scale)
    scale n (0 = coarsest .. stop_scale = finest) has size ceil(h * sf_eff ** (stop_scale - n))

Per scale: generator = ``num_layer`` conv blocks (conv, batch norm, LeakyReLU 0.2; the last is a conv
and tanh) whose output is added to the upsampled previous-scale image; input zero-padded by
``(ker_size - 1) * num_layer / 2``; width ``nfc`` doubling every 4 scales up to 128; weights copied
from the previous scale when the widths match. WGAN-GP with gradient penalty weight 0.1;
reconstruction loss weight alpha 10; noise amplitude 0.1 x RMSE between the image and the upsampled
reconstruction; Adam(5e-4, beta1 0.5) with the rate x0.1 at 80% of the iterations; 3 discriminator
and 3 generator steps per iteration. Every scale is checkpointed; a run resumes at the first
unfinished scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossmoda_lib import devices
from crossmoda_lib import io as cio

# --------------------------------------------------------------------------------------------------
# Settings and pyramid
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinGANConfig:
    """SinGAN settings (paper values by default; see DESIGN.md section 4).

    Attributes:
        scale_factor: requested factor between scales (paper 0.85).
        min_size: size of the coarsest scale's short side.
        max_size: size of the finest scale's long side (the image is downscaled if larger).
        num_scales: the number of scales (generators), coarsest to finest. 0: derived from
            ``scale_factor``, ``min_size`` and ``max_size`` as the original code does. Set, the
            pyramid has exactly this many scales from ``min_size`` to ``max_size`` and the
            effective factor follows (it must stay within 0.05 of ``scale_factor``). The paper's
            "scaling factor is 0.85, which makes N = 17" is read as 17 scales (the original's
            pyramid for a 256 x 256 slice with min_size 25: effective factor 0.867); 18 (N + 1
            generators in the paper's notation) is the other reading (docs/interpretations.md).
        ker_size: convolution kernel (paper 5).
        num_layer: conv blocks per generator/discriminator (5).
        nfc: channels at the coarsest scales (32), doubling every 4 scales up to ``max_nfc`` (128).
        niter: iterations per scale (paper 2000).
        lr: Adam learning rate for both networks (5e-4).
        beta1: Adam beta1 (0.5).
        lr_drop_fraction: the rate is multiplied by ``gamma`` after this fraction of ``niter`` (0.8).
        gamma: learning-rate factor (0.1).
        lambda_grad: WGAN-GP gradient penalty weight (0.1).
        alpha: reconstruction loss weight (10).
        noise_amp: noise amplitude relative to the reconstruction RMSE (0.1).
        g_steps: generator steps per iteration (3).
        d_steps: discriminator steps per iteration (3).
        seed: noise and initialisation seed.
    """

    scale_factor: float = 0.85
    min_size: int = 25
    max_size: int = 256
    num_scales: int = 0
    ker_size: int = 5
    num_layer: int = 5
    nfc: int = 32
    max_nfc: int = 128
    niter: int = 2000
    lr: float = 5e-4
    beta1: float = 0.5
    lr_drop_fraction: float = 0.8
    gamma: float = 0.1
    lambda_grad: float = 0.1
    alpha: float = 10.0
    noise_amp: float = 0.1
    g_steps: int = 3
    d_steps: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), not {self.scale_factor}")
        if self.num_layer < 2 or self.ker_size < 1 or self.ker_size % 2 == 0:
            raise ValueError("num_layer >= 2 and an odd ker_size are required")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, not {self.min_size}, {self.max_size}")
        if self.num_scales < 0 or self.num_scales == 1:
            raise ValueError(f"num_scales must be 0 (derived) or at least 2, not {self.num_scales}")

    @property
    def pad(self) -> int:
        """Zero padding of the generator input: ``(ker_size - 1) * num_layer / 2``."""
        return (self.ker_size - 1) * self.num_layer // 2


@dataclass(frozen=True)
class Pyramid:
    """The scales of one training image."""

    num_scales: int  # the original's num_scales (before the stop scale)
    stop_scale: int  # index of the finest scale; scales are 0..stop_scale
    scale1: float  # resize of the input image to the finest scale
    scale_factor: float  # effective factor between consecutive scales
    sizes: tuple[tuple[int, int], ...]  # (height, width) per scale, coarsest first

    @property
    def n_scales(self) -> int:
        return self.stop_scale + 1


def pyramid_for(height: int, width: int, cfg: SinGANConfig) -> Pyramid:
    """The original ``adjust_scales2image`` and ``creat_reals_pyramid`` arithmetic; with
    ``cfg.num_scales`` set, that many scales between ``min_size`` and the resized slice."""
    sf0 = cfg.scale_factor
    if cfg.num_scales:
        num_scales = cfg.num_scales
        stop_scale = num_scales - 1
    else:
        num_scales = math.ceil(math.log(cfg.min_size / min(height, width)) / math.log(sf0)) + 1
        scale2stop = math.ceil(math.log(min(cfg.max_size, max(height, width)) / max(height, width)) / math.log(sf0))
        stop_scale = num_scales - scale2stop
    scale1 = min(cfg.max_size / max(height, width), 1.0)
    h1, w1 = math.ceil(height * scale1), math.ceil(width * scale1)
    if stop_scale < 1:
        raise ValueError(f"image {height}x{width} is too small for min_size {cfg.min_size}")
    sf = (cfg.min_size / min(h1, w1)) ** (1.0 / stop_scale)
    if cfg.num_scales and abs(sf - sf0) > 0.05:
        raise ValueError(
            f"num_scales {cfg.num_scales} from min_size {cfg.min_size} to {min(h1, w1)} px needs a factor of {sf:.3f} between scales, too far from scale_factor {sf0}; "
            "change num_scales, min_size or max_size"
        )
    # ceil as the original imresize, with a tolerance: 250 * sf**15 is 25 up to float rounding.
    sizes = tuple((math.ceil(h1 * sf ** (stop_scale - n) - 1e-6), math.ceil(w1 * sf ** (stop_scale - n) - 1e-6)) for n in range(stop_scale + 1))
    return Pyramid(num_scales, stop_scale, scale1, sf, sizes)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of (N, C, H, W) to ``size`` (no-op when equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bicubic", align_corners=False, antialias=True)


def image_pyramid(image: torch.Tensor, pyramid: Pyramid) -> list[torch.Tensor]:
    """The training image at every scale (coarsest first); each resized from the full image."""
    return [resize(image, size) for size in pyramid.sizes]


def nfc_at(scale: int, cfg: SinGANConfig) -> int:
    """Channels of the networks at one scale: nfc doubling every 4 scales, at most max_nfc."""
    return min(cfg.nfc * 2 ** (scale // 4), cfg.max_nfc)


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def _block(c_in: int, c_out: int, ker: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, ker, stride=1, padding=0), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


def _body(nfc: int, cfg: SinGANConfig) -> tuple[nn.Sequential, int]:
    """The original's middle blocks: block i maps max(2N, min_nfc) -> max(N, min_nfc) channels with
    N = nfc / 2^(i+1). The original's min_nfc starts at 32 and doubles with nfc, so every block is
    nfc wide; the formula is kept so that the code reads like the original."""
    min_nfc = nfc
    layers, n_out = [], nfc
    for i in range(cfg.num_layer - 2):
        n = int(nfc / 2 ** (i + 1))
        layers.append(_block(max(2 * n, min_nfc), max(n, min_nfc), cfg.ker_size))
        n_out = max(n, min_nfc)
    return nn.Sequential(*layers), n_out


class Generator(nn.Module):
    """One scale's generator: conv blocks on (noise + upsampled image), output added to the image."""

    def __init__(self, nfc: int, cfg: SinGANConfig, channels: int = 1) -> None:
        super().__init__()
        self.head = _block(channels, nfc, cfg.ker_size)
        self.body, n_out = _body(nfc, cfg)
        self.tail = nn.Sequential(nn.Conv2d(n_out, channels, cfg.ker_size, stride=1, padding=0), nn.Tanh())

    def forward(self, noise: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        x = self.tail(self.body(self.head(noise)))
        crop = (prev.shape[2] - x.shape[2]) // 2
        return x + prev[:, :, crop : prev.shape[2] - crop, crop : prev.shape[3] - crop]


class Discriminator(nn.Module):
    """One scale's WGAN critic: conv blocks and a final conv to a score map (no sigmoid)."""

    def __init__(self, nfc: int, cfg: SinGANConfig, channels: int = 1) -> None:
        super().__init__()
        self.head = _block(channels, nfc, cfg.ker_size)
        self.body, n_out = _body(nfc, cfg)
        self.tail = nn.Conv2d(n_out, 1, cfg.ker_size, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))


def init_weights(module: nn.Module) -> None:
    """The original initialisation: conv N(0, 0.02); batch-norm weight N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float, generator: torch.Generator) -> torch.Tensor:
    """WGAN-GP as the original computes it: one mixing weight per call, per-pixel gradient norm over
    channels, ``weight * mean((|grad| - 1)^2)``."""
    a = torch.rand(1, 1, generator=generator).to(real.device).expand_as(real)
    mixed = (a * real + (1 - a) * fake).requires_grad_(True)
    score = critic(mixed)
    grad = torch.autograd.grad(score, mixed, grad_outputs=torch.ones_like(score), create_graph=True, retain_graph=True)[0]
    return ((grad.norm(2, dim=1) - 1) ** 2).mean() * weight


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class SinGANModel:
    """A trained pyramid: generators, fixed reconstruction noises, noise amplitudes, real images,
    all on ``device`` (noise is drawn on the CPU and moved there, so it is the same on every device)."""

    cfg: SinGANConfig
    pyramid: Pyramid
    generators: list[Generator] = field(default_factory=list)
    z_opt: list[torch.Tensor] = field(default_factory=list)  # padded reconstruction noise per scale
    noise_amps: list[float] = field(default_factory=list)
    reals: list[torch.Tensor] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def n_trained(self) -> int:
        return len(self.generators)


def _noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(device)


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x, (pad, pad, pad, pad))


def draw(model: SinGANModel, upto: int, mode: str, generator: torch.Generator | None = None, start: torch.Tensor | None = None, start_scale: int = 0, resize_last: bool = True) -> torch.Tensor:
    """Run generators ``start_scale .. upto - 1`` and return the result upsampled to scale ``upto``
    (the original's ``draw_concat``), or at scale ``upto - 1``'s size with ``resize_last=False``.

    Args:
        model: the (partly) trained pyramid.
        upto: the scale whose input is wanted (the output has that scale's size).
        mode: ``"rec"`` (fixed reconstruction noises) or ``"rand"`` (fresh noise from ``generator``).
        generator: noise source for ``"rand"``.
        start: the image entering ``start_scale`` (default zeros, for a full generation from scale 0).
        start_scale: first generator to run.
    """
    pad = model.cfg.pad
    g_z = start.to(model.device) if start is not None else torch.zeros(1, 1, *model.pyramid.sizes[start_scale], device=model.device)
    for n in range(start_scale, upto):
        size = model.pyramid.sizes[n]
        if mode == "rec":
            z = model.z_opt[n]
        else:
            z = _pad(_noise((1, 1, *size), generator, model.device), pad)
        prev = _pad(g_z, pad)
        g_z = model.generators[n](model.noise_amps[n] * z + prev, prev)
        if n + 1 < model.pyramid.n_scales and (resize_last or n + 1 < upto):
            g_z = resize(g_z, model.pyramid.sizes[n + 1])
    return g_z


def train_scale(model: SinGANModel, n: int, progress: bool = True, prev_state: tuple[dict, dict] | None = None) -> tuple[Generator, Discriminator, dict]:
    """Train the generator and critic of scale ``n`` given the trained scales below it.

    Returns:
        The generator, the critic and a history dict (per-iteration losses, noise amplitude).
    """
    from tqdm.auto import tqdm

    cfg = model.cfg
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + n)
    torch.manual_seed(cfg.seed * 1000 + n)
    nfc = nfc_at(n, cfg)
    net_g, net_d = Generator(nfc, cfg), Discriminator(nfc, cfg)
    init_weights(net_g)
    init_weights(net_d)
    net_g.to(model.device)
    net_d.to(model.device)
    if prev_state is not None and nfc_at(n - 1, cfg) == nfc:  # warm start, as the original
        net_g.load_state_dict(prev_state[0])
        net_d.load_state_dict(prev_state[1])
    real = model.reals[n]
    size = tuple(real.shape[-2:])
    pad = cfg.pad
    opt_g = torch.optim.Adam(net_g.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    milestone = [int(round(cfg.lr_drop_fraction * cfg.niter))]
    sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones=milestone, gamma=cfg.gamma)
    sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, milestones=milestone, gamma=cfg.gamma)
    padded = (1, 1, size[0] + 2 * pad, size[1] + 2 * pad)
    if n == 0:
        z_opt = _pad(_noise((1, 1, *size), gen, model.device), pad)  # fixed reconstruction noise z*
        z_prev = torch.zeros(padded, device=model.device)
        noise_amp = 1.0
    else:
        z_opt = torch.zeros(padded, device=model.device)
        with torch.no_grad():
            rec = draw(model, n, "rec")
        noise_amp = cfg.noise_amp * float(torch.sqrt(F.mse_loss(real, rec)))
        z_prev = _pad(rec, pad)
    history = {"errD": [], "errG": [], "rec": [], "noise_amp": noise_amp}
    bar = tqdm(range(cfg.niter), desc=f"04 SinGAN scale {n}/{model.pyramid.stop_scale}", disable=not progress, leave=False)
    for _ in bar:
        noise_ = _pad(_noise((1, 1, *size), gen, model.device), pad)
        for _ in range(cfg.d_steps):
            net_d.zero_grad(set_to_none=True)
            err_real = -net_d(real).mean()
            if n == 0:
                prev = torch.zeros_like(noise_)
                noise = noise_
            else:
                with torch.no_grad():
                    prev = _pad(draw(model, n, "rand", gen), pad)
                noise = noise_amp * noise_ + prev
            fake = net_g(noise, prev)
            err_fake = net_d(fake.detach()).mean()
            gp = gradient_penalty(net_d, real, fake.detach(), cfg.lambda_grad, gen)
            (err_real + err_fake + gp).backward()
            opt_d.step()
        for _ in range(cfg.g_steps):
            net_g.zero_grad(set_to_none=True)
            fake = net_g(noise, prev)  # recomputed: the original reused a stale graph here
            err_g = -net_d(fake).mean()
            rec_loss = cfg.alpha * F.mse_loss(net_g(noise_amp * z_opt + z_prev, z_prev), real) if cfg.alpha else real.new_zeros(())
            (err_g + rec_loss).backward()
            opt_g.step()
        sched_g.step()
        sched_d.step()
        history["errD"].append(float((err_real + err_fake + gp).detach()))
        history["errG"].append(float(err_g.detach()))
        history["rec"].append(float(rec_loss.detach()))
    net_g.eval()
    net_d.eval()
    for p in [*net_g.parameters(), *net_d.parameters()]:
        p.requires_grad_(False)
    model.generators.append(net_g)
    model.z_opt.append(z_opt)
    model.noise_amps.append(noise_amp)
    return net_g, net_d, history


def train_singan(
    image: torch.Tensor, cfg: SinGANConfig, out_dir: Path | str, *, progress: bool = True, stop_after_scale: int | None = None, device: str | torch.device = "cpu"
) -> tuple[SinGANModel, list[dict]]:
    """Train (or resume) a SinGAN pyramid on one image; one checkpoint per scale in ``out_dir``.

    Args:
        image: (1, 1, H, W) in [-1, 1].
        cfg: settings.
        out_dir: holds ``scale_NN.pt`` per finished scale and ``histories.json``.
        progress: progress bars.
        stop_after_scale: stop once this scale is finished (tests, split runs).
        device: where the pyramid trains (:func:`crossmoda_lib.devices.resolve`); the image pyramid
            is computed on the CPU and moved there.

    Returns:
        The model (all trained scales) and per-scale histories.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = devices.use(device)
    image = image.cpu()
    pyramid = pyramid_for(image.shape[-2], image.shape[-1], cfg)
    model = SinGANModel(cfg, pyramid, reals=[r.to(device) for r in image_pyramid(image, pyramid)], device=device)
    key = {"config": asdict(cfg), "image_shape": list(image.shape), "image_sum": float(image.double().sum())}
    histories: list[dict] = []
    prev_state = None
    for n in tqdm(range(pyramid.n_scales), desc="04 SinGAN", disable=not progress):
        ckpt = out_dir / f"scale_{n:02d}.pt"
        if ckpt.exists():
            saved = cio.load_checkpoint(ckpt)
            # A scale saved before a setting existed (num_scales) holds that setting's default.
            made = {**saved["key"], "config": {**asdict(SinGANConfig()), **saved["key"]["config"]}}
            if made != key:
                raise ValueError(f"{ckpt}: made with other settings or another image; delete {out_dir} or use another folder")
            net_g = Generator(nfc_at(n, cfg), cfg)
            net_g.load_state_dict(saved["G"])
            net_g.to(device).eval()
            for p in net_g.parameters():
                p.requires_grad_(False)
            model.generators.append(net_g)
            model.z_opt.append(saved["z_opt"].to(device))
            model.noise_amps.append(saved["noise_amp"])
            histories.append(saved["history"])
            prev_state = (saved["G"], saved["D"])
        else:
            net_g, net_d, history = train_scale(model, n, progress, prev_state)
            prev_state = (net_g.state_dict(), net_d.state_dict())
            payload = {"key": key, "G": prev_state[0], "D": prev_state[1], "z_opt": model.z_opt[n], "noise_amp": model.noise_amps[n], "history": history}
            cio.save_torch_atomic(ckpt, payload)
            histories.append(history)
        if stop_after_scale is not None and n >= stop_after_scale:
            break
    return model, histories


def load_singan(out_dir: Path | str, image: torch.Tensor, cfg: SinGANConfig, device: str | torch.device = "cpu") -> SinGANModel:
    """A finished pyramid from its checkpoints, on ``device``; raises (naming the notebook) when a scale is missing."""
    pyramid = pyramid_for(image.shape[-2], image.shape[-1], cfg)
    missing = [n for n in range(pyramid.n_scales) if not (Path(out_dir) / f"scale_{n:02d}.pt").exists()]
    if missing:
        raise cio.DataError(f"{out_dir}: SinGAN scales {missing} are not trained; run notebooks/04_singan.ipynb")
    model, _ = train_singan(image, cfg, out_dir, progress=False, device=device)
    return model


# --------------------------------------------------------------------------------------------------
# Generation and harmonization
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model: SinGANModel, seed: int, start_scale: int = 0, upto: int | None = None) -> torch.Tensor:
    """A random sample at scale ``upto - 1`` (default: the finest): reconstruction noise below
    ``start_scale`` (gen_start_scale of the original), fresh seeded noise from there on."""
    upto = model.pyramid.n_scales if upto is None else upto
    gen = torch.Generator().manual_seed(seed)
    start = draw(model, start_scale, "rec") if start_scale > 0 else None
    return draw(model, upto, "rand", gen, start=start, start_scale=start_scale, resize_last=False) if upto > start_scale else start


@torch.no_grad()
def reconstruct(model: SinGANModel, upto: int | None = None) -> torch.Tensor:
    """The reconstruction of the training image (fixed noises) at scale ``upto - 1`` (default: the
    finest scale)."""
    upto = model.pyramid.n_scales if upto is None else upto
    return draw(model, upto, "rec", resize_last=False)


@torch.no_grad()
def harmonize(model: SinGANModel, ref: torch.Tensor, start_scale: int, seed: int) -> torch.Tensor:
    """The original harmonization pass on a (1, 1, h, w) image of the finest scale's size.

    ``ref`` is pushed down to scale ``start_scale - 1``, upsampled once to ``start_scale``, and
    generators ``start_scale .. N`` run on it with seeded noise.
    """
    n_top = model.pyramid.n_scales - 1
    if not 1 <= start_scale <= n_top:
        raise ValueError(f"start scale {start_scale} outside 1..{n_top} (this pyramid has {n_top + 1} scales)")
    sizes = model.pyramid.sizes
    in_s = resize(resize(ref.to(model.device), sizes[start_scale - 1]), sizes[start_scale])
    gen = torch.Generator().manual_seed(seed)
    return draw(model, n_top + 1, "rand", gen, start=in_s, start_scale=start_scale)


def describe(model: SinGANModel) -> list[dict]:
    """One row per scale: size, channels, noise amplitude."""
    return [
        {"scale": n, "height": h, "width": w, "channels": nfc_at(n, model.cfg), "noise_amp": round(model.noise_amps[n], 5) if n < model.n_trained else None}
        for n, (h, w) in enumerate(model.pyramid.sizes)
    ]


def save_summary(model: SinGANModel, out_dir: Path | str, extra: dict) -> None:
    """``manifest.json`` of stage 04: settings, pyramid and the training slice."""
    from crossmoda_lib import __version__

    summary = {
        "stage": "04_singan",
        "library_version": __version__,
        "settings": asdict(model.cfg),
        "pyramid": {
            "num_scales": model.pyramid.num_scales,
            "stop_scale": model.pyramid.stop_scale,
            "scale1": model.pyramid.scale1,
            "scale_factor": model.pyramid.scale_factor,
            "sizes": [list(s) for s in model.pyramid.sizes],
        },
        "noise_amps": model.noise_amps,
        **extra,
    }
    cio.write_text_atomic(Path(out_dir) / "manifest.json", json.dumps(summary, indent=2) + "\n")


def choose_training_slice(volume: np.ndarray, percentile: float = 99.0) -> int:
    """The default slice rule: the axial slice holding most voxels above the volume's ``percentile``
    (on hrT2, the bright fluid: internal auditory canals, cochleae, labyrinth, cisterns)."""
    threshold = np.percentile(volume, percentile)
    return int((volume > threshold).sum(axis=(1, 2)).argmax())


# --------------------------------------------------------------------------------------------------
# Stage 04
# --------------------------------------------------------------------------------------------------


def pick_training_slice(stage01: Path | str, centre: str, case: str = "", slice_index: int = -1) -> tuple[str, int, np.ndarray]:
    """The one real hrT2 slice the SinGAN learns from.

    Default rule: the first stage-01 ``training_target`` case (name order) of ``centre``, and in it the
    axial slice with most voxels above the 99th percentile (:func:`choose_training_slice`). ``case``
    and ``slice_index`` override either choice.

    Returns:
        ``(case, slice index, slice (H, W) in [0, 1])``.
    """
    import SimpleITK as sitk

    folder = Path(stage01) / "target"
    if case:
        path = folder / f"{case}_hrT2.nii.gz"
        if not path.exists():
            raise cio.DataError(f"{path}: no such stage-01 hrT2 (singan_case)")
    else:
        candidates = [p for p in sorted(folder.glob("*_hrT2.nii.gz")) if cio.centre_of(p.name) == centre]
        if not candidates:
            raise cio.DataError(f"{folder}: no {centre} hrT2; run notebooks/01_preprocess.ipynb or choose another singan_centre")
        path = candidates[0]
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    z = choose_training_slice(volume) if slice_index < 0 else int(slice_index)
    if not 0 <= z < volume.shape[0]:
        raise cio.DataError(f"{path}: slice {z} outside 0..{volume.shape[0] - 1}")
    return path.name.removesuffix("_hrT2.nii.gz"), z, volume[z]


def train_stage(
    stage01: Path | str, out_dir: Path | str, cfg: SinGANConfig, centre: str, case: str = "", slice_index: int = -1, *, progress: bool = True, device: str | torch.device = "cpu"
) -> tuple[SinGANModel, list[dict]]:
    """Stage 04: pick the training slice, train (or resume, or reuse) the pyramid on ``device``, write
    the manifest and ``training_slice.npy`` (the image stage 05 needs to rebuild the pyramid)."""
    device = devices.resolve(device)
    out_dir = Path(out_dir)
    case, z, slice01 = pick_training_slice(stage01, centre, case, slice_index)
    image = torch.from_numpy(slice01)[None, None] * 2 - 1
    model, histories = train_singan(image, cfg, out_dir, progress=progress, device=device)
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, slice01)
    cio.write_bytes_atomic(out_dir / "training_slice.npy", buf.getvalue())
    save_summary(model, out_dir, {"training_case": case, "training_slice": z, "training_centre": cio.centre_of(case)})
    return model, histories


def load_stage(stage04: Path | str, device: str | torch.device = "cpu") -> SinGANModel:
    """The finished pyramid of stage 04 (settings from its manifest, image from training_slice.npy), on ``device``."""
    device = devices.resolve(device)
    stage04 = Path(stage04)
    manifest = stage04 / "manifest.json"
    if not manifest.exists():
        raise cio.DataError(f"{stage04}: no finished SinGAN (manifest.json missing); run notebooks/04_singan.ipynb first")
    settings = json.loads(manifest.read_text())["settings"]
    image = torch.from_numpy(np.load(stage04 / "training_slice.npy"))[None, None] * 2 - 1
    return load_singan(stage04, image, SinGANConfig(**settings), device)


def _np(x: torch.Tensor) -> np.ndarray:
    return ((x[0, 0] + 1) / 2).clamp(0, 1).cpu().numpy()


def figure_rows(model: SinGANModel, seeds: tuple[int, ...] = (1, 2, 3), start_scales: tuple[int, ...] | None = None) -> dict[str, list]:
    """Rows for ``figures.image_grid``: the training pyramid and its reconstructions at a few scales,
    and random samples started at several scales (below the start scale, the fixed reconstruction
    noise; above it, fresh noise)."""
    n = model.pyramid.n_scales
    shown = sorted({0, n // 3, (2 * n) // 3, n - 1})
    pyramid = [
        ("training pyramid", [(f"scale {k} ({h}x{w})", _np(model.reals[k])) for k, (h, w) in ((k, model.pyramid.sizes[k]) for k in shown)]),
        ("reconstruction", [(f"scale {k}", _np(reconstruct(model, k + 1))) for k in shown]),
    ]
    start_scales = start_scales or tuple(sorted({0, n // 2, n - 2}))
    samples = [(f"samples from scale {s}", [(f"seed {seed}", _np(sample(model, seed, start_scale=s))) for seed in seeds]) for s in start_scales]
    return {"pyramid": pyramid, "samples": samples}
