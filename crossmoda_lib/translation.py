"""Stage 02-03: a 2D CycleGAN that translates ceT1 slices into pseudo-hrT2 (and back).

A faithful single-channel version of the original implementation (Zhu et al. 2017,
junyanz/pytorch-CycleGAN-and-pix2pix), written here because the original package is not
installable as a library and has 3-channel image loading built in:

* generator: ResNet (7x7 reflection-padded stem, two stride-2 downsamplings, ``n_blocks`` residual
  blocks with reflection padding, two transposed-convolution upsamplings, 7x7 output conv, tanh),
  instance normalisation without affine parameters, convolution biases on (as the original with
  instance norm);
* discriminator: the ``n_layers``-layer PatchGAN (4x4 convolutions, LeakyReLU 0.2, instance norm);
  with 3 layers each output sees a 70x70 input patch;
* losses: LSGAN (mean squared error to 1/0), cycle L1 weight ``lambda_cycle`` (10) in both
  directions, identity L1 weight ``lambda_identity`` x ``lambda_cycle`` (0.5 x 10);
* an image pool of 50 earlier fakes for the discriminators; Adam(2e-4, beta1 0.5); the learning rate
  constant for ``n_epochs`` then linearly decaying to 0 over ``n_epochs_decay`` (original rule);
  weights initialised N(0, 0.02); batch 1; random horizontal flips.

Domain A is ceT1, domain B is hrT2: ``G_A`` maps ceT1 -> pseudo-hrT2, ``G_B`` hrT2 -> pseudo-ceT1,
``D_A`` judges hrT2-domain images, ``D_B`` ceT1-domain images (the original's naming).

Intensities: stage 01 leaves volumes in [0, 1]; the networks see ``2 x - 1`` in [-1, 1] (the tanh
range) and outputs are mapped back with ``(y + 1) / 2``: an invertible, documented rule.

Reproducibility: parameters are initialised from ``seed``; the data order, the unpaired hrT2 draws,
the flips and the image pools use their own ``torch.Generator`` objects whose states are saved in
every checkpoint with the models, optimisers, scheduler and pools, so a resumed run equals an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from crossmoda_lib import config, devices
from crossmoda_lib import io as cio

# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

#: Seeds of the screened draws are ``seed + DRAW_SEED_STRIDE * k``: far from ``seed + 1 .. + 3``, which
#: the sampler and the image pools of every draw use.
DRAW_SEED_STRIDE = 1000


@dataclass(frozen=True)
class CycleGANConfig:
    """Every CycleGAN setting; defaults are the paper's / the original implementation's.

    Attributes:
        ngf: generator width (filters of the first layer).
        ndf: discriminator width.
        n_blocks: residual blocks of the generator (9 at 256 px).
        n_layers_d: PatchGAN layers (3: 70x70 receptive field).
        image_size: (height, width) the slices are resized to for training and translation; None
            keeps the stage-01 size. Both must be multiples of 4.
        lambda_cycle: cycle-consistency weight (both directions).
        lambda_identity: identity weight, relative to ``lambda_cycle``.
        pool_size: image pool of earlier fakes (0 disables it).
        lr: Adam learning rate.
        beta1: Adam beta1.
        n_epochs: epochs at constant learning rate.
        n_epochs_decay: epochs of linear decay to 0.
        batch_size: slices per iteration (paper: 1).
        random_crop: train on random ``random_crop`` x ``random_crop`` crops of the slices (the original
            implementation's ``resize_and_crop``: load 286, crop 256); None trains on whole slices.
            The generators are fully convolutional and translate whole slices either way; 72-px crops
            of 144x176 slices make an iteration about 2.5x cheaper on a CPU (the demo's budget).
        whole_epochs: with ``random_crop``, the first ``whole_epochs`` epochs train on whole slices
            and the crops start after them (0: crops from the first iteration). A crop of part of
            ceT1's dark CSF cannot be told from dark temporal bone, which lets a draw stay caught
            near the identity mapping; whole slices let every measured draw leave it
            (docs/experiments.md), at 2.4x the time per iteration.
        flip: random horizontal flips.
        init_gain: standard deviation of the N(0, gain) weight initialisation.
        seed: initialisation and sampling seed.
        log_every: iterations between rows of ``losses.csv`` (means over the window).
        checkpoint_every: iterations between checkpoints (and at every epoch end).
        draws: CycleGANs started from different seeds (``seed + 1000 k``, k = 0 .. draws-1) that
            :func:`train_stage` trains for ``draw_epochs`` each, scores by the tumour's band Dice
            (:func:`vs_measures`) on the translated source volumes, and of which it trains only the best to the end. 1
            (the paper): one CycleGAN, no screening. Draw 0 is the CycleGAN that ``draws: 1`` trains.
        draw_epochs: epochs each draw trains before the screen (when ``draws`` > 1).
    """

    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    n_layers_d: int = 3
    image_size: tuple[int, int] | None = None
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50
    lr: float = 2e-4
    beta1: float = 0.5
    n_epochs: int = 100
    n_epochs_decay: int = 100
    batch_size: int = 1
    random_crop: int | None = None
    whole_epochs: int = 0
    flip: bool = True
    init_gain: float = 0.02
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    draws: int = 1
    draw_epochs: int = 0

    def __post_init__(self) -> None:
        if self.image_size is not None and any(int(s) % 4 for s in self.image_size):
            raise ValueError(f"image_size must be multiples of 4 (two stride-2 downsamplings), not {self.image_size}")
        smallest = 3 * 2**self.n_layers_d  # the PatchGAN's strided convolutions, then two 4x4 ones, leave one score
        if self.random_crop is not None and (self.random_crop < smallest or self.random_crop % 4):
            raise ValueError(f"random_crop must be a multiple of 4 and at least {smallest} (PatchGAN with {self.n_layers_d} layers), not {self.random_crop}")
        for name in ("ngf", "ndf", "n_layers_d", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, not {self.draws}")
        if self.draws > 1 and not 1 <= self.draw_epochs <= self.n_epochs + self.n_epochs_decay:
            raise ValueError(f"draw_epochs must be between 1 and the {self.n_epochs + self.n_epochs_decay} epochs of training when draws > 1, not {self.draw_epochs}")
        if self.whole_epochs < 0 or self.whole_epochs > self.n_epochs + self.n_epochs_decay:
            raise ValueError(f"whole_epochs must be between 0 and the {self.n_epochs + self.n_epochs_decay} epochs of training, not {self.whole_epochs}")
        if self.n_blocks < 0 or self.n_epochs < 0 or self.n_epochs_decay < 0 or self.n_epochs + self.n_epochs_decay < 1:
            raise ValueError("n_blocks >= 0 and at least one epoch are required")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CycleGANConfig:
        """The inverse of :meth:`as_dict` (a checkpoint's or ``config.json``'s settings); keys that
        an older version did not write take their defaults (:meth:`complete`)."""
        d = cls.complete(d)
        d["image_size"] = tuple(d["image_size"]) if d["image_size"] else None
        return cls(**d)

    @classmethod
    def complete(cls, d: dict) -> dict:
        """Settings as written by :meth:`as_dict`, with the keys added since (``whole_epochs``) at
        their defaults, which reproduce what the older version did."""
        return {**cls().as_dict(), **d}

    def draw(self, k: int) -> CycleGANConfig:
        """The settings of draw ``k`` of the screen (:attr:`draws`): the same, with seed ``seed + 1000 k``."""
        return replace(self, seed=self.seed + DRAW_SEED_STRIDE * k)


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with instance norm, added to the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), _norm(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), _norm(dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """The CycleGAN ResNet generator (two downsamplings, ``n_blocks`` residual blocks)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=True), _norm(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2**i
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True), _norm(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=True), _norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The ``n_layers`` PatchGAN: a map of real/fake scores, each over a square input patch."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=True), _norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=True), _norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def receptive_field(model: nn.Module) -> int:
    """Receptive field (pixels) of a plain stack of convolutions: ``1 + sum (k - 1) * prod(strides)``."""
    rf, jump = 1, 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * jump
            jump *= m.stride[0]
    return rf


def init_weights(model: nn.Module, gain: float = 0.02) -> None:
    """The original 'normal' initialisation: conv weights N(0, gain), biases 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ImagePool:
    """A buffer of earlier generated images (Shrivastava et al.), as in the original code: until full,
    return the new image and store it; then with probability 1/2 return a stored one (replacing it
    with the new image), else the new image. Its randomness is its own generator's."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(1, generator=self.generator).item() > 0.5:
                idx = int(torch.randint(0, self.size, (1,), generator=self.generator).item())
                out.append(self.images[idx].to(image.device))  # a resumed pool's images are on the CPU
                self.images[idx] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [t.clone() for t in self.images], "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.images = [t.clone() for t in state["images"]]
        self.generator.set_state(state["generator"])


@dataclass
class CycleGAN:
    """The four networks of a CycleGAN (A: ceT1, B: hrT2)."""

    G_A: ResnetGenerator
    G_B: ResnetGenerator
    D_A: PatchDiscriminator
    D_B: PatchDiscriminator

    @classmethod
    def build(cls, cfg: CycleGANConfig) -> CycleGAN:
        torch.manual_seed(cfg.seed)
        nets = cls(
            ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks),
            ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks),
            PatchDiscriminator(1, cfg.ndf, cfg.n_layers_d),
            PatchDiscriminator(1, cfg.ndf, cfg.n_layers_d),
        )
        for net in nets.modules():
            init_weights(net, cfg.init_gain)
        return nets

    def modules(self) -> list[nn.Module]:
        return [self.G_A, self.G_B, self.D_A, self.D_B]

    def to(self, device: torch.device) -> CycleGAN:
        for net in self.modules():
            net.to(device)
        return self

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in ("G_A", "G_B", "D_A", "D_B")}

    def load_state_dict(self, state: dict) -> None:
        for name in ("G_A", "G_B", "D_A", "D_B"):
            getattr(self, name).load_state_dict(state[name])


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def to_network(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return torch.as_tensor(x, dtype=torch.float32) * 2.0 - 1.0


def from_network(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (inverse of :func:`to_network`)."""
    return (y + 1.0) / 2.0


def resize_slices(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear resize of (N, 1, H, W) slices (no-op when size is None or equal)."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def volume_slices(path: Path | str, *, min_anatomy_fraction: float = 0.1, anatomy_threshold: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices of a stage-01 volume that hold anatomy.

    A slice holds anatomy when at least ``min_anatomy_fraction`` of its voxels exceed
    ``anatomy_threshold`` (intensities in [0, 1]); padding and air-only slices are skipped.

    Returns:
        ``(slices (N, H, W) float32, their z indices)``.
    """
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    keep = (arr > anatomy_threshold).mean(axis=(1, 2)) >= min_anatomy_fraction
    return arr[keep], np.nonzero(keep)[0]


def collect_slices(paths: list[Path], image_size: tuple[int, int] | None, **anatomy) -> torch.Tensor:
    """Slices of several volumes as an (N, 1, H, W) tensor in [-1, 1], resized to ``image_size``."""
    chunks = []
    for path in paths:
        slices, _ = volume_slices(path, **anatomy)
        if len(slices):
            chunks.append(resize_slices(to_network(slices[:, None]), image_size))
    if not chunks:
        raise cio.DataError(f"no slice with anatomy in {len(paths)} volume(s): {[str(p) for p in paths[:3]]}")
    return torch.cat(chunks, 0)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


LOSS_NAMES = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")


def epoch_steps(n_slices: int, cfg: CycleGANConfig) -> int:
    """Iterations of one epoch: one pass over the ceT1 slices in batches of ``batch_size``."""
    return -(-n_slices // cfg.batch_size)


def lr_factor(epoch: int, cfg: CycleGANConfig) -> float:
    """The original linear rule (epoch_count = 1): constant for n_epochs, then linear decay."""
    return 1.0 - max(0, epoch + 1 - cfg.n_epochs) / float(cfg.n_epochs_decay + 1)


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the networks."""

    epoch: int = 0
    step_in_epoch: int = 0
    iteration: int = 0
    order: torch.Tensor | None = None
    history: list[dict] = field(default_factory=list)
    window: list[list[float]] = field(default_factory=list)
    finished: bool = False


def _lsgan(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(prediction, torch.full_like(prediction, 1.0 if real else 0.0))


def _set_requires_grad(nets: list[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def train_step(nets: CycleGAN, real_a: torch.Tensor, real_b: torch.Tensor, opt_g, opt_d, pool_a: ImagePool, pool_b: ImagePool, cfg: CycleGANConfig) -> dict[str, float]:
    """One CycleGAN iteration (generators, then both discriminators), as the original orders it."""
    lam = cfg.lambda_cycle
    fake_b = nets.G_A(real_a)
    rec_a = nets.G_B(fake_b)
    fake_a = nets.G_B(real_b)
    rec_b = nets.G_A(fake_a)
    _set_requires_grad([nets.D_A, nets.D_B], False)
    opt_g.zero_grad(set_to_none=True)
    losses = {}
    if cfg.lambda_identity > 0:
        losses["idt_A"] = F.l1_loss(nets.G_A(real_b), real_b) * lam * cfg.lambda_identity
        losses["idt_B"] = F.l1_loss(nets.G_B(real_a), real_a) * lam * cfg.lambda_identity
    else:
        losses["idt_A"] = losses["idt_B"] = real_a.new_zeros(())
    losses["G_A"] = _lsgan(nets.D_A(fake_b), True)
    losses["G_B"] = _lsgan(nets.D_B(fake_a), True)
    losses["cycle_A"] = F.l1_loss(rec_a, real_a) * lam
    losses["cycle_B"] = F.l1_loss(rec_b, real_b) * lam
    sum(losses[k] for k in ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B")).backward()
    opt_g.step()
    _set_requires_grad([nets.D_A, nets.D_B], True)
    opt_d.zero_grad(set_to_none=True)
    pooled_b = pool_b.query(fake_b)
    losses["D_A"] = 0.5 * (_lsgan(nets.D_A(real_b), True) + _lsgan(nets.D_A(pooled_b.detach()), False))
    losses["D_A"].backward()
    pooled_a = pool_a.query(fake_a)
    losses["D_B"] = 0.5 * (_lsgan(nets.D_B(real_a), True) + _lsgan(nets.D_B(pooled_a.detach()), False))
    losses["D_B"].backward()
    opt_d.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _flip(x: torch.Tensor, generator: torch.Generator, enabled: bool) -> torch.Tensor:
    if not enabled:
        return x
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def _crop(x: torch.Tensor, generator: torch.Generator, size: int | None) -> torch.Tensor:
    """A random ``size`` x ``size`` crop (the same window for the whole batch); the slice itself
    when ``size`` is None or not smaller than it."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    top = int(torch.randint(0, max(1, h - size + 1), (1,), generator=generator))
    left = int(torch.randint(0, max(1, w - size + 1), (1,), generator=generator))
    return x[..., top : top + size, left : left + size]


def train_cyclegan(
    slices_a: torch.Tensor, slices_b: torch.Tensor, cfg: CycleGANConfig, out_dir: Path | str, *, stop_after: int | None = None,
    progress: bool = True, device: str | torch.device = "cpu",
) -> tuple[CycleGAN, pd.DataFrame]:
    """Train (or resume, or reuse) a CycleGAN; checkpoints and ``losses.csv`` go to ``out_dir``.

    Args:
        slices_a: ceT1 slices (N, 1, H, W) in [-1, 1].
        slices_b: hrT2 slices (M, 1, H, W) in [-1, 1], unpaired.
        cfg: settings.
        out_dir: holds ``checkpoint.pt`` (resumed when its settings match) and ``losses.csv``.
        stop_after: stop (with a checkpoint) once this many iterations are done in total; used to
            test resumption and to split long runs.
        progress: progress bar.
        device: where the networks train (:func:`crossmoda_lib.devices.resolve`). Slices, crops,
            flips and image-pool draws stay on the CPU, so they are the same on every device.

    Returns:
        The networks (on ``device``) and the loss history.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    device = devices.use(device)
    nets = CycleGAN.build(cfg).to(device)  # initialised on the CPU: the same weights on every device
    params_g = itertools.chain(nets.G_A.parameters(), nets.G_B.parameters())
    params_d = itertools.chain(nets.D_A.parameters(), nets.D_B.parameters())
    opt_g = torch.optim.Adam(params_g, lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(params_d, lr=cfg.lr, betas=(cfg.beta1, 0.999))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda e: lr_factor(e, cfg))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda e: lr_factor(e, cfg))
    pool_a, pool_b = ImagePool(cfg.pool_size, cfg.seed + 2), ImagePool(cfg.pool_size, cfg.seed + 3)
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    state = TrainState()
    data_key = [list(slices_a.shape), list(slices_b.shape)]
    if ckpt_path.exists():
        saved = cio.load_checkpoint(ckpt_path)
        if CycleGANConfig.complete(saved["config"]) != cfg.as_dict() or saved["data_shapes"] != data_key:
            raise ValueError(f"{ckpt_path}: checkpoint was made with other settings or data; delete it or use another output folder")
        nets.load_state_dict(saved["nets"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        sched_g.load_state_dict(saved["sched_g"])
        sched_d.load_state_dict(saved["sched_d"])
        pool_a.load_state_dict(saved["pool_a"])
        pool_b.load_state_dict(saved["pool_b"])
        sampler.set_state(saved["sampler"])
        state = saved["state"]
    for net in nets.modules():
        net.train()
    n_a = slices_a.shape[0]
    steps_per_epoch = epoch_steps(n_a, cfg)
    total_epochs = cfg.n_epochs + cfg.n_epochs_decay
    total = total_epochs * steps_per_epoch

    def checkpoint() -> None:
        cio.save_torch_atomic(
            ckpt_path,
            {
                "config": cfg.as_dict(),
                "data_shapes": data_key,
                "nets": nets.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "sched_g": sched_g.state_dict(),
                "sched_d": sched_d.state_dict(),
                "pool_a": pool_a.state_dict(),
                "pool_b": pool_b.state_dict(),
                "sampler": sampler.get_state(),
                "state": state,
            },
        )

    bar = tqdm(total=total, initial=state.iteration, desc="02 CycleGAN", disable=not progress or state.finished)
    while not state.finished and state.epoch < total_epochs:
        if state.order is None:
            state.order = torch.randperm(n_a, generator=sampler)
        while state.step_in_epoch < steps_per_epoch:
            if stop_after is not None and state.iteration >= stop_after:
                checkpoint()
                bar.close()
                return nets, pd.DataFrame(state.history)
            idx = state.order[state.step_in_epoch * cfg.batch_size : (state.step_in_epoch + 1) * cfg.batch_size]
            idx_b = torch.randint(0, slices_b.shape[0], (len(idx),), generator=sampler)
            crop = cfg.random_crop if state.epoch >= cfg.whole_epochs else None
            real_a = _crop(_flip(slices_a[idx], sampler, cfg.flip), sampler, crop).to(device)
            real_b = _crop(_flip(slices_b[idx_b], sampler, cfg.flip), sampler, crop).to(device)
            losses = train_step(nets, real_a, real_b, opt_g, opt_d, pool_a, pool_b, cfg)
            state.window.append([losses[k] for k in LOSS_NAMES])
            state.iteration += 1
            state.step_in_epoch += 1
            bar.update(1)
            if state.iteration % cfg.log_every == 0 or state.iteration == total:
                means = np.mean(state.window, axis=0)
                state.history.append({"iteration": state.iteration, "epoch": state.epoch + 1, "lr": opt_g.param_groups[0]["lr"], **dict(zip(LOSS_NAMES, (float(m) for m in means)))})
                state.window = []
                cio.write_text_atomic(out_dir / "losses.csv", pd.DataFrame(state.history).to_csv(index=False))
            if state.iteration % cfg.checkpoint_every == 0:
                checkpoint()
        state.epoch += 1
        state.step_in_epoch = 0
        state.order = None
        sched_g.step()
        sched_d.step()
        checkpoint()
    bar.close()
    if not state.finished:
        state.finished = True
        checkpoint()
        cio.write_text_atomic(out_dir / "config.json", json.dumps(cfg.as_dict(), indent=2) + "\n")
    for net in nets.modules():
        net.eval()
    return nets, pd.DataFrame(state.history)


def load_generators(ckpt_path: Path | str, device: str | torch.device = "cpu") -> tuple[ResnetGenerator, ResnetGenerator, CycleGANConfig]:
    """The two generators (ceT1 -> hrT2, hrT2 -> ceT1) of a finished checkpoint, in eval mode, on ``device``."""
    saved = cio.load_checkpoint(ckpt_path)
    if not saved["state"].finished:
        raise ValueError(f"{ckpt_path}: training has not finished (iteration {saved['state'].iteration}); run 02 again to resume")
    cfg = CycleGANConfig.from_dict(saved["config"])
    g_a, g_b = ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks), ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks)
    g_a.load_state_dict(saved["nets"]["G_A"])
    g_b.load_state_dict(saved["nets"]["G_B"])
    device = devices.use(device)
    return g_a.to(device).eval(), g_b.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def translate_array(generator: nn.Module, volume: np.ndarray, image_size: tuple[int, int] | None, batch_size: int = 16) -> np.ndarray:
    """Translate every axial slice of a (Z, H, W) volume in [0, 1]; returns (Z, H, W) in [0, 1].

    Slices are resized to the training size, translated in batches without gradients (on the
    generator's device), and resized back to the volume's in-plane size.
    """
    generator.eval()
    device = next(generator.parameters()).device
    out = np.empty_like(volume, dtype=np.float32)
    size = tuple(volume.shape[1:])
    for start in range(0, volume.shape[0], batch_size):
        x = to_network(volume[start : start + batch_size, None]).to(device)
        y = generator(resize_slices(x, image_size))
        out[start : start + batch_size] = from_network(resize_slices(y, size))[:, 0].clamp(0, 1).cpu().numpy()
    return out


def translate_image(generator: nn.Module, image: sitk.Image, image_size: tuple[int, int] | None, batch_size: int = 16) -> sitk.Image:
    """Translate a stage-01 volume slice by slice and restack it in the source geometry."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    result = sitk.GetImageFromArray(translate_array(generator, arr, image_size, batch_size))
    result.CopyInformation(image)
    return result


# --------------------------------------------------------------------------------------------------
# Stages 02 and 03
# --------------------------------------------------------------------------------------------------


def stage_volumes(stage01: Path | str, sub: str, modality: str, centres: list[str] | tuple[str, ...]) -> list[Path]:
    """Stage-01 volumes of one sub-folder (``source``, ``target``, ``validation``) and centres."""
    known = set(cio.CENTRES.values())
    unknown = sorted(set(centres) - known)
    if unknown:
        raise ValueError(f"unknown centre(s) {unknown}; choose from {sorted(known)}")
    paths = sorted(Path(stage01, sub).glob(f"*_{modality}.nii.gz"))
    return [p for p in paths if cio.centre_of(p.name) in centres]


def train_stage(
    stage01: Path | str,
    out_dir: Path | str,
    cfg: CycleGANConfig,
    centres: list[str],
    *,
    min_anatomy_fraction: float = 0.1,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CycleGAN, pd.DataFrame, dict]:
    """Stage 02: train the CycleGAN on stage-01 ceT1 (source) and hrT2 (target) slices of ``centres``.

    Every input volume, and the device, is checked before training starts. With ``cfg.draws`` > 1
    the draws are screened first (:func:`screen_draws`) and the chosen one trains on to the end in
    its folder (``stop_after`` counts its iterations); its finished checkpoint, losses and settings
    are then copied to ``out_dir``, where stage 03 finds them. Returns the networks, the loss history
    and a summary (slices and cases per domain; with a screen, the chosen draw and its seed).
    """
    device = devices.resolve(device)
    stage01 = config.require_stage(stage01, "01_preprocess")
    paths_a = stage_volumes(stage01, "source", "ceT1", centres)
    paths_b = stage_volumes(stage01, "target", "hrT2", centres)
    for label, paths in (("ceT1 (source)", paths_a), ("hrT2 (target)", paths_b)):
        if not paths:
            raise cio.DataError(f"{stage01}: no {label} volume of centre(s) {centres}")
    problems = [p for path in paths_a + paths_b for p in cio.check_image_file(path)[1] if p.fatal]
    if problems:
        raise cio.DataError("\n".join(str(p) for p in problems))
    slices_a = collect_slices(paths_a, cfg.image_size, min_anatomy_fraction=min_anatomy_fraction)
    slices_b = collect_slices(paths_b, cfg.image_size, min_anatomy_fraction=min_anatomy_fraction)
    summary = {
        "centres": list(centres),
        "ceT1_cases": len(paths_a),
        "hrT2_cases": len(paths_b),
        "ceT1_slices": int(slices_a.shape[0]),
        "hrT2_slices": int(slices_b.shape[0]),
        "slice_size": list(slices_a.shape[-2:]),
    }
    out_dir = Path(out_dir)
    if cfg.draws == 1:
        nets, history = train_cyclegan(slices_a, slices_b, cfg, out_dir, stop_after=stop_after, progress=progress, device=device)
    else:
        screen_paths = stage_volumes(stage01, "source", "ceT1", list(cio.CENTRES.values()))
        table = screen_draws(slices_a, slices_b, cfg, out_dir, screen_paths, progress=progress, device=device)
        best = int(table.loc[table.chosen, "draw"].iloc[0])
        summary["draw"] = best
        summary["draw_seed"] = cfg.draw(best).seed
        folder = draw_dir(out_dir, best)
        nets, history = train_cyclegan(slices_a, slices_b, cfg.draw(best), folder, stop_after=stop_after, progress=progress, device=device)
        if (folder / "config.json").exists():  # finished: the chosen draw becomes the stage's CycleGAN
            for name in ("checkpoint.pt", "losses.csv", "config.json"):
                data = (folder / name).read_bytes()
                if not (out_dir / name).exists() or (out_dir / name).read_bytes() != data:
                    cio.write_bytes_atomic(out_dir / name, data)
    if (out_dir / "config.json").exists():
        from crossmoda_lib import __version__

        manifest = {"stage": "02_cyclegan", "library_version": __version__, "settings": cfg.as_dict(), "min_anatomy_fraction": min_anatomy_fraction, **summary}
        cio.write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return nets, history, summary


def draw_dir(out_dir: Path | str, k: int) -> Path:
    """Where draw ``k`` of the screen trains (``02_cyclegan/draws/draw_<k>/``)."""
    return Path(out_dir) / "draws" / f"draw_{k}"


#: Columns of ``02_cyclegan/draws.csv``, one row per screened draw.
DRAW_COLUMNS = ("draw", "seed", "iterations", "vs_band_dice", "vs_csf_contrast", "vs_level", "cases", "chosen")
#: The draw gate's criterion (a column of ``draws.csv``): the highest wins.
DRAW_CRITERION = "vs_band_dice"


def screen_draws(
    slices_a: torch.Tensor, slices_b: torch.Tensor, cfg: CycleGANConfig, out_dir: Path | str, source_paths: list[Path], *, progress: bool = True, device: str | torch.device = "cpu"
) -> pd.DataFrame:
    """The draw gate: train ``cfg.draws`` CycleGANs (:meth:`CycleGANConfig.draw`) for
    ``cfg.draw_epochs`` epochs each, translate every source ceT1 volume with each and score it by
    :data:`DRAW_CRITERION` (:func:`vs_measures`) against the source labels; the best draw is ``chosen``.

    Only the source labels and the unlabelled hrT2 the CycleGAN trains on are used, never a target
    label. Each draw resumes from its own folder (:func:`draw_dir`); a draw's score is written to
    ``draws.csv`` as soon as it exists and read back on the next call, so the screen is done once
    even after the chosen draw has trained on. Returns the table (:data:`DRAW_COLUMNS`).
    """
    out_dir = Path(out_dir)
    table_path = out_dir / "draws.csv"
    key_path = out_dir / "draws.json"
    key = {"settings": cfg.as_dict(), "data_shapes": [list(slices_a.shape), list(slices_b.shape)], "source_volumes": [p.name for p in source_paths]}
    rows: list[dict] = []
    if table_path.exists():
        saved = json.loads(key_path.read_text()) if key_path.exists() else None
        if saved != key:
            raise ValueError(f"{table_path}: made with other settings or data; delete {out_dir} or use another output folder")
        rows = pd.read_csv(table_path).drop(columns="chosen").to_dict("records")
    cio.write_text_atomic(key_path, json.dumps(key, indent=2) + "\n")
    stop = cfg.draw_epochs * epoch_steps(slices_a.shape[0], cfg)
    done = {int(r["draw"]) for r in rows}
    for k in range(cfg.draws):
        if k in done:
            continue
        dcfg = cfg.draw(k)
        if progress:
            print(f"02 CycleGAN: draw {k + 1} of {cfg.draws} (seed {dcfg.seed}), {cfg.draw_epochs} epochs ({stop} iterations)", flush=True)
        nets, _ = train_cyclegan(slices_a, slices_b, dcfg, draw_dir(out_dir, k), stop_after=stop, progress=progress, device=device)
        rows.append({"draw": k, "seed": dcfg.seed, "iterations": stop, **source_translation_scores(nets.G_A, cfg.image_size, source_paths)})
        _write_draws(table_path, rows)
    return _write_draws(table_path, rows)


def _write_draws(path: Path, rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows).sort_values("draw").reset_index(drop=True)
    table["chosen"] = False
    table.loc[table[DRAW_CRITERION].idxmax(), "chosen"] = True  # ties: the lowest draw
    table = table[list(DRAW_COLUMNS)]
    cio.write_text_atomic(path, table.to_csv(index=False))
    return table


def vs_measures(image: np.ndarray, vs: np.ndarray, spacing_zyx: tuple[float, float, float], *, ring_mm: tuple[float, float] = (1.0, 4.0), csf_percentile: float = 90.0) -> dict[str, float]:
    """How hrT2-like a translated tumour is, from its source label only.

    On hrT2 the VS lies in the CSF of the cerebellopontine cistern and the internal auditory canal
    and is darker than it (papers/000, Fig. 1; the synthetic cohort's real hrT2 puts the tumour at
    about half the CSF); on ceT1 the enhancing tumour is brighter than everything around it. With
    ``ring`` the voxels ``ring_mm`` from the tumour, ``csf`` the ``csf_percentile`` of the ring (its
    brightest surroundings) and ``inside`` the median in the tumour:

    * ``vs_csf_contrast`` = (csf - inside) / the volume's 99th percentile: about +0.45 on the
      synthetic real hrT2, -0.6 to -1.1 on ceT1 (a CycleGAN caught near the identity mapping),
      about 0 where the tumour was painted as CSF;
    * ``vs_band_dice`` (the draw gate's criterion): the Dice between the tumour and the voxels of
      tumour and ring whose intensity lies within half the tumour-to-CSF gap of ``inside``: a
      tumour that stands apart from the CSF as one region of its own scores high (about 0.65 on
      the synthetic real hrT2), one caught near the identity mapping (brighter than the CSF: no
      band) or painted as CSF (no gap) 0, and one that the translation broke into pieces as dark
      as parenchyma and as bright as CSF in between. Unlike ``vs_csf_contrast``, it tells apart two
      demo CycleGANs with the same contrast (+0.41, +0.43) of which one translates the tumour
      usably and one does not (docs/experiments.md);
    * ``vs_level`` = inside / the volume's 99th percentile.

    NaN when ``vs`` is empty. A translation that painted the tumour as dark as a flow void would
    still score well: the criterion guards against the failures seen, not against every failure.
    """
    from scipy import ndimage

    vs = np.asarray(vs, dtype=bool)
    if not vs.any():
        return {"vs_csf_contrast": float("nan"), "vs_band_dice": float("nan"), "vs_level": float("nan")}
    distance = ndimage.distance_transform_edt(~vs, sampling=spacing_zyx)
    ring = (distance > ring_mm[0]) & (distance <= ring_mm[1])
    scale = max(float(np.percentile(image, 99)), 1e-6)
    inside = float(np.median(image[vs]))
    csf = float(np.percentile(image[ring], csf_percentile))
    band = (np.abs(image - inside) < (csf - inside) / 2.0) & (vs | ring)
    dice = 2.0 * float((band & vs).sum()) / float(band.sum() + vs.sum())
    return {"vs_csf_contrast": (csf - inside) / scale, "vs_band_dice": dice, "vs_level": inside / scale}


def source_translation_scores(generator: nn.Module, image_size: tuple[int, int] | None, source_paths: list[Path]) -> dict[str, float]:
    """The measures of :func:`vs_measures` on ``generator``'s translation of each source ceT1
    volume (stage 01, with its ``_Label``), means over the volumes with a VS; ``cases`` counts them."""
    scores = []
    for path in source_paths:
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_ceT1.nii.gz", "_Label.nii.gz")))
        if not (labels == 1).any():
            continue
        pseudo = translate_array(generator, sitk.GetArrayFromImage(image).astype(np.float32), image_size)
        scores.append(vs_measures(pseudo, labels == 1, image.GetSpacing()[::-1]))
    if not scores:
        raise cio.DataError(f"no source label with a VS among {[p.name for p in source_paths[:3]]}...: the draw gate needs one")
    return {key: float(np.mean([r[key] for r in scores])) for key in ("vs_band_dice", "vs_csf_contrast", "vs_level")} | {"cases": len(scores)}


def translate_stage(stage01: Path | str, checkpoint: Path | str, out_dir: Path | str, *, batch_size: int = 16, progress: bool = True, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Stage 03 (first half): translate every stage-01 ceT1 volume (all centres) into pseudo-hrT2.

    Writes ``out_dir/<case>_pseudoT2.nii.gz`` (same geometry as the ceT1) with the label copied as
    ``out_dir/<case>_Label.nii.gz``.
    """
    from tqdm.auto import tqdm

    device = devices.resolve(device)  # before anything is read
    stage01 = config.require_stage(stage01, "01_preprocess")
    g_a, _, cfg = load_generators(checkpoint, device)
    out_dir = Path(out_dir)
    rows = []
    for path in tqdm(stage_volumes(stage01, "source", "ceT1", list(cio.CENTRES.values())), desc="03 translate", disable=not progress):
        case = path.name.removesuffix("_ceT1.nii.gz")
        image = sitk.ReadImage(str(path))
        pseudo = translate_image(g_a, image, cfg.image_size, batch_size)
        cio.write_image(pseudo, out_dir / f"{case}_pseudoT2.nii.gz")
        label = path.parent / f"{case}_Label.nii.gz"
        cio.write_bytes_atomic(out_dir / label.name, label.read_bytes())
        rows.append({"case": case, "centre": cio.centre_of(case), "file": f"{out_dir.name}/{case}_pseudoT2.nii.gz", "size": "x".join(map(str, image.GetSize()))})
    return pd.DataFrame(rows)


def vs_slice(label_path: Path | str) -> int:
    """The axial slice index with the largest VS area (the middle slice when there is no VS)."""
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    area = (lab == 1).sum(axis=(1, 2))
    return int(area.argmax()) if area.any() else lab.shape[0] // 2


def _slice(path: Path, z: int) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[z].astype(np.float32)


def cycle_examples(stage01: Path | str, checkpoint: Path | str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Rows for a figure: per centre, a ceT1 slice -> pseudo-hrT2 -> reconstructed ceT1, and a
    validation hrT2 slice (never used in training) -> pseudo-ceT1 -> reconstructed hrT2."""
    stage01 = Path(stage01)
    g_a, g_b, cfg = load_generators(checkpoint)
    rows = []
    for centre in cio.CENTRES.values():
        src = stage_volumes(stage01, "source", "ceT1", [centre])
        val = stage_volumes(stage01, "validation", "hrT2", [centre])
        if src:
            z = vs_slice(src[0].parent / src[0].name.replace("_ceT1", "_Label"))
            x = _slice(src[0], z)[None]
            fake = translate_array(g_a, x, cfg.image_size)
            rec = translate_array(g_b, fake, cfg.image_size)
            rows.append((f"{centre} ceT1\n{src[0].name.split('_ceT1')[0]}", [("ceT1", x[0]), ("pseudo-hrT2 = G_A(ceT1)", fake[0]), ("G_B(G_A(ceT1))", rec[0])]))
        if val:
            truth = cio.truth_label_path(stage01, val[0].name)
            z = vs_slice(truth) if truth.exists() else sitk.ReadImage(str(val[0])).GetSize()[2] // 2
            x = _slice(val[0], z)[None]
            fake = translate_array(g_b, x, cfg.image_size)
            rec = translate_array(g_a, fake, cfg.image_size)
            rows.append((f"{centre} hrT2 (validation)\n{val[0].name.split('_hrT2')[0]}", [("hrT2", x[0]), ("pseudo-ceT1 = G_B(hrT2)", fake[0]), ("G_A(G_B(hrT2))", rec[0])]))
    return rows


def comparison_rows(stage01: Path | str, stage03: Path | str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Rows for a figure: per centre, ceT1 | pseudo-hrT2 | Van Cittert-sharpened | a real hrT2 (another
    subject of the same centre, at its own VS slice)."""
    stage01, stage03 = Path(stage01), Path(stage03)
    rows = []
    for centre in cio.CENTRES.values():
        src = stage_volumes(stage01, "source", "ceT1", [centre])
        tgt = stage_volumes(stage01, "target", "hrT2", [centre])
        if not src:
            continue
        case = src[0].name.removesuffix("_ceT1.nii.gz")
        z = vs_slice(src[0].parent / f"{case}_Label.nii.gz")
        panels = [
            ("ceT1", _slice(src[0], z)),
            ("pseudo-hrT2", _slice(stage03 / "pseudo_hrT2" / f"{case}_pseudoT2.nii.gz", z)),
            ("Van Cittert", _slice(stage03 / "pseudo_hrT2_vc" / f"{case}_pseudoT2.nii.gz", z)),
        ]
        if tgt:
            truth = cio.truth_label_path(stage01, tgt[0].name)
            zt = vs_slice(truth) if truth.exists() else sitk.ReadImage(str(tgt[0])).GetSize()[2] // 2
            panels.append((f"real hrT2 ({tgt[0].name.split('_hrT2')[0]})", _slice(tgt[0], zt)))
        rows.append((f"{centre}\n{case}", panels))
    return rows
