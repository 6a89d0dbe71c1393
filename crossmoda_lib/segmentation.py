"""Stage 06: nnU-Net-like 3D segmentation with MONAI's DynUNet, one binary model per structure.

The paper trains nnU-Net 3D full-resolution models (papers/000 section 3). This module rebuilds the
parts of nnU-Net that matter for the method from MONAI pieces, with every size a parameter:

* **planning** (:func:`plan_network`): nnU-Net's ``get_pool_and_conv_props``: an axis is pooled while
  its feature map is at least twice ``min_feature_map`` and its spacing at most twice the finest
  current spacing; a convolution kernel is 1 along an axis until that axis comes within a factor 2
  of the finest spacing, then 3; the bottleneck is 3x3x3. At 0.4x0.4x1.0 mm the z axis keeps stride 1
  and kernel 1 at the first level; at 0.6x0.6x1.0 mm every axis is strided from the start;
* **network**: DynUNet with instance norm, leaky ReLU (0.01), filters 32 doubling to 320, deep
  supervision (weights 1/2^i, normalised);
* **loss**: Dice + cross-entropy (batch Dice); **optimiser**: SGD, Nesterov momentum 0.99, lr 1e-2
  with polynomial decay (exponent 0.9), weight decay 3e-5, gradient norm clipped at 12;
* **data**: epochs of a fixed number of iterations (250 in the paper profile); patches with
  foreground oversampling (the last third of each batch is centred on a foreground voxel); MONAI
  augmentation in nnU-Net's spirit (rotation and scaling, optional elastic deformation, Gaussian noise
  and blur, brightness, contrast, gamma, mirroring);
* **inference**: sliding window with Gaussian weighting and overlap 0.5, optional mirroring
  test-time augmentation.

Arrays are in (z, y, x) order throughout, so spacings and patch sizes given here are (z, y, x) too.
Reproducibility: the network is initialised from ``seed``; patch sampling, augmentation and torch
random states are saved in every checkpoint, so a resumed run equals an uninterrupted one on the CPU.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from crossmoda_lib import devices, metrics
from crossmoda_lib import io as cio

# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkPlan:
    """Kernels and strides per level (z, y, x), and the patch size padded to what pooling needs."""

    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    pools_per_axis: tuple[int, ...]


def plan_network(spacing: tuple[float, ...], patch_size: tuple[int, ...], min_feature_map: int = 4, max_pools: int = 5) -> NetworkPlan:
    """nnU-Net's ``get_pool_and_conv_props`` (v1/v2 planners), for (z, y, x) spacings and patches."""
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [int(s) for s in patch_size]
    strides = [[1] * dim]
    kernels = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        valid = [i for i in valid if pools[i] < max_pools]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            current_spacing[v] *= 2
            current_size[v] = math.ceil(current_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)  # the bottleneck
    divisor = [2**p for p in pools]
    padded = tuple(int(math.ceil(s / d) * d) for s, d in zip(patch_size, divisor))
    return NetworkPlan(tuple(tuple(k) for k in kernels), tuple(tuple(s) for s in strides), padded, tuple(pools))


# --------------------------------------------------------------------------------------------------
# Settings and network
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegConfig:
    """Segmentation settings (paper / nnU-Net values by default; (z, y, x) order).

    Attributes:
        spacing: voxel spacing of the training volumes (z, y, x), for planning.
        patch_size: training patch (z, y, x) before padding to the pooling divisor.
        base_filters: filters of the first level (nnU-Net 32), doubling per level up to max_filters.
        max_filters: nnU-Net 320 (3D).
        min_feature_map: planning constraint (nnU-Net 4).
        max_pools: most poolings per axis (nnU-Net 5).
        batch_size: patches per iteration (nnU-Net 2).
        epochs: epochs (paper 500).
        iterations_per_epoch: nnU-Net 250.
        optimizer: ``"sgd"`` (nnU-Net: SGD with Nesterov momentum) or ``"adam"`` (nnU-Net's
            ``nnUNetTrainerAdam`` variant; converges in far fewer iterations, for CPU budgets).
        lr: initial learning rate (SGD 1e-2; Adam 3e-4 in nnU-Net's variant).
        momentum: SGD Nesterov momentum (0.99; unused by Adam).
        weight_decay: 3e-5.
        fg_fraction: fraction of each batch centred on foreground (nnU-Net 0.33).
        fg_jitter: where the foreground voxel of such a patch lies: the centre plus a uniform offset
            of up to this fraction of half the patch along each axis (0: at the centre, as nnU-Net
            samples; 1: anywhere in the patch). With few training volumes, centred patches teach
            the network that the structure sits at the patch centre, and sliding-window inference
            then marks false regions at window centres (docs/method.md, stage 06).
        elastic: elastic deformation in the augmentation (nnU-Net: off for 3d_fullres).
        augment: apply the augmentation.
        overlap: sliding-window overlap (0.5).
        mirror_tta: average predictions over mirrored inputs at inference.
        val_every: epochs between validation Dice measurements (0: never).
        seed: initialisation and sampling seed.
    """

    spacing: tuple[float, float, float] = (1.0, 0.6, 0.6)
    patch_size: tuple[int, int, int] = (64, 160, 160)
    base_filters: int = 32
    max_filters: int = 320
    min_feature_map: int = 4
    max_pools: int = 5
    batch_size: int = 2
    epochs: int = 500
    iterations_per_epoch: int = 250
    optimizer: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    fg_fraction: float = 0.33
    fg_jitter: float = 0.0
    elastic: bool = False
    augment: bool = True
    overlap: float = 0.5
    mirror_tta: bool = True
    val_every: int = 1
    seed: int = 0

    @property
    def plan(self) -> NetworkPlan:
        return plan_network(self.spacing, self.patch_size, self.min_feature_map, self.max_pools)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["spacing"], d["patch_size"] = list(self.spacing), list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegConfig:
        d = dict(d)
        d["spacing"], d["patch_size"] = tuple(d["spacing"]), tuple(d["patch_size"])
        return cls(**d)


#: Memory layout of the networks' weights and inputs.
CHANNELS_LAST = torch.channels_last_3d


def build_network(cfg: SegConfig) -> torch.nn.Module:
    """DynUNet from the plan: instance norm, leaky ReLU, deep supervision on all but the two coarsest levels."""
    from monai.networks.nets import DynUNet

    plan = cfg.plan
    levels = len(plan.strides)
    filters = [min(cfg.base_filters * 2**i, cfg.max_filters) for i in range(levels)]
    torch.manual_seed(cfg.seed)
    net = DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        kernel_size=[list(k) for k in plan.kernels],
        strides=[list(s) for s in plan.strides],
        upsample_kernel_size=[list(s) for s in plan.strides[1:]],
        filters=filters,
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        deep_supervision=levels > 2,
        deep_supr_num=max(1, levels - 2),
    )
    # Channels-last 3D tensors (weights here, inputs in train() and predict_probabilities()): oneDNN's
    # 3D convolutions are faster in that layout on a CPU; benchmarks/bench_segmentation.py measures it
    # (--layout). The same arithmetic up to float rounding.
    return net.to(memory_format=CHANNELS_LAST)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights 1/2^i for the full-resolution output and the deeper ones, normalised."""
    w = np.array([1 / 2**i for i in range(n)])
    return (w / w.sum()).tolist()


# --------------------------------------------------------------------------------------------------
# Data: patches and augmentation
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One training volume (z, y, x) in [0, 1] with its binary target."""

    name: str
    image: np.ndarray
    target: np.ndarray
    foreground: np.ndarray = field(default=None, repr=False)  # (N, 3) foreground voxel indices

    def __post_init__(self) -> None:
        if self.foreground is None:
            self.foreground = np.argwhere(self.target > 0)


def clip_to_percentile(image: np.ndarray, percentile: float | None) -> np.ndarray:
    """``clip(image, 0, p) / p`` with ``p`` the image's ``percentile``-th percentile (unchanged for None)."""
    if percentile is None:
        return image
    top = float(np.percentile(image, percentile))
    return (np.clip(image, 0, top) / max(top, 1e-6)).astype(np.float32)


def load_case(image_path: Path | str, label_path: Path | str, value: int, clip_percentile: float | None = None) -> Case:
    """Read a volume and its label; the target is ``label == value``. ``clip_percentile`` clips the
    image at that percentile and rescales to [0, 1] (the paper clips real hrT2 at the 95th for cochlea)."""
    image = clip_to_percentile(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32), clip_percentile)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    match = CASE_RE.match(Path(image_path).name)
    return Case(match.group(0) if match else Path(image_path).name, image, (label == value).astype(np.uint8))


class PatchSampler:
    """nnU-Net-style patch sampling with its own generator (whose state is checkpointed)."""

    def __init__(self, cases: list[Case], patch: tuple[int, ...], fg_fraction: float, seed: int, fg_jitter: float = 0.0) -> None:
        if not 0.0 <= fg_jitter <= 1.0:
            raise ValueError(f"fg_jitter must lie in [0, 1], not {fg_jitter}")
        self.cases = cases
        self.patch = np.array(patch)
        self.fg_fraction = fg_fraction
        self.fg_jitter = fg_jitter
        self.rng = np.random.default_rng(seed)

    def _one(self, case: Case, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        shape = np.array(case.image.shape)
        half = self.patch // 2
        if force_fg and len(case.foreground):
            centre = case.foreground[self.rng.integers(len(case.foreground))]
            if self.fg_jitter > 0:
                reach = (self.fg_jitter * (half - 1)).astype(int)  # the voxel stays inside the patch
                centre = centre + np.array([self.rng.integers(-r, r + 1) for r in reach])
        else:
            centre = np.array([self.rng.integers(0, s) for s in shape])
        start = centre - half
        image = np.zeros(tuple(self.patch), dtype=np.float32)
        target = np.zeros(tuple(self.patch), dtype=np.uint8)
        src = [slice(max(0, a), min(s, a + p)) for a, s, p in zip(start, shape, self.patch)]
        dst = [slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start)]
        image[tuple(dst)] = case.image[tuple(src)]
        target[tuple(dst)] = case.target[tuple(src)]
        return image, target

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        images, targets = [], []
        for i in range(batch_size):
            case = self.cases[self.rng.integers(len(self.cases))]
            force = i >= round(batch_size * (1 - self.fg_fraction))
            im, tg = self._one(case, force)
            images.append(im)
            targets.append(tg)
        return np.stack(images)[:, None], np.stack(targets)[:, None]


def augmentation(cfg: SegConfig):
    """nnU-Net-style augmentation from MONAI transforms (dictionary keys ``image`` and ``label``)."""
    from monai import transforms as T

    keys = ["image", "label"]
    ops = [
        T.RandAffined(keys, prob=0.2, rotate_range=(math.pi / 6,) * 3, scale_range=(0.15,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]
    if cfg.elastic:
        ops.append(T.Rand3DElasticd(keys, sigma_range=(9, 13), magnitude_range=(0, 900), prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros"))
    ops += [
        T.RandGaussianNoised("image", prob=0.1, mean=0.0, std=0.1),
        T.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        T.RandScaleIntensityd("image", factors=0.25, prob=0.15),  # brightness (multiplicative)
        T.RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=0.15),  # contrast
        T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),  # gamma
        T.RandFlipd(keys, spatial_axis=0, prob=0.5),
        T.RandFlipd(keys, spatial_axis=1, prob=0.5),
        T.RandFlipd(keys, spatial_axis=2, prob=0.5),
    ]
    compose = T.Compose(ops)
    compose.set_random_state(cfg.seed + 7)
    return compose


def _transform_state(compose) -> bytes:
    """The whole transform chain, pickled: MONAI's dictionary transforms nest further random
    transforms (RandAffined -> RandAffine -> RandAffineGrid), each with its own random state."""
    return pickle.dumps(compose)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def poly_lr(epoch: int, cfg: SegConfig) -> float:
    """nnU-Net's polynomial decay: lr0 * (1 - epoch / epochs) ** 0.9."""
    return cfg.lr * (1 - epoch / cfg.epochs) ** 0.9


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks, 1.0 when both are empty (a training-time convenience; the challenge
    rule, :func:`crossmoda_lib.metrics.dice`, scores that case 0)."""
    p, t = pred > 0, truth > 0
    return 1.0 if not (p.any() or t.any()) else metrics.dice(p, t)


def make_optimizer(net: torch.nn.Module, cfg: SegConfig) -> torch.optim.Optimizer:
    """nnU-Net's SGD (Nesterov momentum 0.99) or, with ``optimizer: adam``, its Adam variant."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.optimizer!r}: use 'sgd' or 'adam'")


def make_loss():
    """nnU-Net's Dice + cross-entropy (1:1): batch Dice over the foreground channel only (nnU-Net's
    ``do_bg=False``; a background Dice near 1 would otherwise halve the foreground's gradient), CE
    over both channels."""
    from monai.losses import DiceCELoss

    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)


def train(
    cases: list[Case], val_cases: list[Case], cfg: SegConfig, out_dir: Path | str, *, stop_after_epoch: int | None = None,
    progress: bool = True, device: str | torch.device = "cpu", init_from: Path | str | None = None,
) -> tuple[torch.nn.Module, pd.DataFrame]:
    """Train (or resume, or reuse) one binary model; ``checkpoint.pt`` and ``history.csv`` in ``out_dir``.

    Args:
        cases: training volumes.
        val_cases: validation volumes (Dice by sliding window every ``val_every`` epochs; may be empty).
        cfg: settings.
        out_dir: model folder.
        stop_after_epoch: stop (with a checkpoint) after this many epochs in total.
        progress: progress bar.
        device: where the network trains (:func:`crossmoda_lib.devices.resolve`); patches are
            drawn and augmented on the CPU, so their random draws are the same on every device.
        init_from: a finished model folder (``fold_k``) whose weights start this training instead
            of the seeded initialisation (warm start; the optimiser and the schedule start afresh).
            Its network must have this plan's shapes (:func:`check_warm_start`). Recorded in the
            checkpoint, so a resume with another (or no) ``init_from`` is refused.

    Returns:
        The network (eval mode, on ``device``) and the per-epoch history (loss, lr, validation Dice).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    plan = cfg.plan
    device = devices.use(device)
    net = build_network(cfg).to(device)
    opt = make_optimizer(net, cfg)
    sampler = PatchSampler(cases, plan.patch_size, cfg.fg_fraction, cfg.seed + 1, cfg.fg_jitter)
    augment = augmentation(cfg)
    loss_fn = make_loss()
    epoch, history, finished = 0, [], False
    key = {"config": cfg.as_dict(), "cases": list(cases.names) if hasattr(cases, "names") else [c.name for c in cases]}
    if init_from is not None:
        key["init_from"] = str(init_from)
    if ckpt_path.exists():
        saved = cio.load_checkpoint(ckpt_path)
        # A checkpoint written before a setting existed holds that setting's default.
        saved_key = {**saved["key"], "config": {**SegConfig().as_dict(), **saved["key"]["config"]}}
        if saved_key != key:
            raise ValueError(f"{ckpt_path}: checkpoint was made with other settings or cases; delete it or use another folder")
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        sampler.rng.bit_generator.state = saved["sampler"]
        augment = pickle.loads(saved["augment"])
        torch.set_rng_state(saved["torch"])
        epoch, history, finished = saved["epoch"], saved["history"], saved["finished"]
    else:
        if init_from is not None:
            net.load_state_dict(warm_start_weights(init_from, cfg))
        torch.manual_seed(cfg.seed + 2)

    def checkpoint() -> None:
        cio.save_torch_atomic(
            ckpt_path,
            {
                "key": key,
                "net": net.state_dict(),
                "opt": opt.state_dict(),
                "sampler": sampler.rng.bit_generator.state,
                "augment": _transform_state(augment),
                "torch": torch.get_rng_state(),
                "epoch": epoch,
                "history": history,
                "finished": finished,
                "plan": asdict(plan),
            },
        )

    bar = tqdm(total=cfg.epochs, initial=epoch, desc=f"06 training {out_dir.name}", disable=not progress or finished)
    while not finished and epoch < cfg.epochs:
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            checkpoint()
            bar.close()
            net.eval()
            return net, pd.DataFrame(history)
        lr = poly_lr(epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        net.train()
        losses = []
        for _ in range(cfg.iterations_per_epoch):
            images, targets = sampler.batch(cfg.batch_size)
            if cfg.augment:
                pairs = [augment({"image": im, "label": tg}) for im, tg in zip(images, targets)]
                images = np.stack([np.asarray(p["image"]) for p in pairs])
                targets = np.stack([np.asarray(p["label"]) for p in pairs])
            x = torch.as_tensor(images, dtype=torch.float32).to(device).contiguous(memory_format=CHANNELS_LAST)
            y = torch.as_tensor(np.round(targets), dtype=torch.float32).to(device)
            out = net(x)
            if out.dim() == 6:  # deep supervision: (B, heads, C, z, y, x)
                weights = deep_supervision_weights(out.shape[1])
                loss = sum(w * loss_fn(out[:, i], y) for i, w in enumerate(weights))
            else:
                loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
            losses.append(float(loss.detach()))
        epoch += 1
        row = {"epoch": epoch, "lr": lr, "loss": float(np.mean(losses))}
        if val_cases and cfg.val_every and epoch % cfg.val_every == 0:
            net.eval()
            row["val_dice"] = float(np.mean([dice_score(predict_mask(net, np.array(c.image), cfg), c.target) for c in val_cases]))
        history.append(row)
        cio.write_text_atomic(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
        finished = epoch >= cfg.epochs
        checkpoint()
        bar.update(1)
    bar.close()
    net.eval()
    return net, pd.DataFrame(history)


def warm_start_weights(model_dir: Path | str, cfg: SegConfig) -> dict:
    """The weights of the finished model in ``model_dir``, checked to fit a network planned from
    ``cfg`` (:func:`check_warm_start`); a ValueError naming the folder otherwise."""
    net, teacher = load_model(model_dir)  # refuses an unfinished model, naming its folder
    check_warm_start(teacher, cfg, model_dir)
    return net.state_dict()


def check_warm_start(teacher: SegConfig, student: SegConfig, where: Path | str) -> None:
    """A ValueError naming ``where`` unless the two settings build networks of the same shapes
    (the plan's kernels and strides, and the filters), so that one can start from the other."""
    a, b = teacher.plan, student.plan
    shape = lambda c, p: (p.kernels, p.strides, c.base_filters, c.max_filters)  # noqa: E731
    if shape(teacher, a) != shape(student, b):
        raise ValueError(
            f"{where}: cannot warm-start from it: its network (kernels {a.kernels}, strides {a.strides}, {teacher.base_filters} base filters) "
            f"differs from the one to train (kernels {b.kernels}, strides {b.strides}, {student.base_filters} base filters); "
            "a finer final_spacing or another patch size changes the plan, so train from scratch there"
        )


def load_model(model_dir: Path | str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, SegConfig]:
    """A finished model (eval mode, on ``device``) and its settings."""
    saved = cio.load_checkpoint(Path(model_dir) / "checkpoint.pt")
    if not saved["finished"]:
        raise ValueError(f"{model_dir}: training has not finished (epoch {saved['epoch']}); run it again to resume")
    cfg = SegConfig.from_dict(saved["key"]["config"])
    net = build_network(cfg)
    net.load_state_dict(saved["net"])
    return net.to(devices.use(device)).eval(), cfg


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_probabilities(nets: list[torch.nn.Module] | torch.nn.Module, image: np.ndarray, cfg: SegConfig) -> np.ndarray:
    """Foreground probability (z, y, x) of an ensemble: Gaussian-weighted sliding windows, overlap
    ``cfg.overlap``, averaged over models and (with ``mirror_tta``) the 8 mirrorings. The volume is
    computed on the networks' device; the result is a NumPy array."""
    from monai.inferers import sliding_window_inference

    nets = nets if isinstance(nets, list) else [nets]
    x = torch.as_tensor(image, dtype=torch.float32)[None, None].to(next(nets[0].parameters()).device)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if cfg.mirror_tta else [()]
    total = torch.zeros_like(x[:, :1])
    for net in nets:
        net.eval()
        for axes in flips:
            xi = x.flip(axes) if axes else x
            logits = sliding_window_inference(xi, cfg.plan.patch_size, 4, lambda w: net(w.contiguous(memory_format=CHANNELS_LAST)), overlap=cfg.overlap, mode="gaussian", padding_mode="constant")
            prob = torch.softmax(logits, dim=1)[:, 1:2]
            total += prob.flip(axes) if axes else prob
    return (total / (len(nets) * len(flips)))[0, 0].cpu().numpy()


def predict_mask(nets, image: np.ndarray, cfg: SegConfig) -> np.ndarray:
    """Binary prediction (probability > 0.5)."""
    return (predict_probabilities(nets, image, cfg) > 0.5).astype(np.uint8)


def largest_components(mask: np.ndarray, n: int) -> np.ndarray:
    """Keep the ``n`` largest 3D connected components (6-connectivity; equal sizes: the first in
    scan order); fewer stay as they are, empty stays empty."""
    from scipy import ndimage

    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    comps, found = ndimage.label(mask > 0)
    if found <= n:
        return (mask > 0).astype(np.uint8)
    sizes = np.bincount(comps.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:n] + 1
    return np.isin(comps, keep).astype(np.uint8)


def check_component_count(value, name: str = "cochlea_components") -> int:
    """``value`` if it is a component count (an integer >= 0, 0 keeping every component), else a
    ValueError that names the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 keeps every component), not {value!r}")
    return value


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep exactly the largest 3D connected component (6-connectivity); empty stays empty."""
    return largest_components(mask, 1)


def kfold(names: list[str], folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(train indices, validation indices) per fold; one fold trains on everything (no validation)."""
    if folds <= 1:
        return [(list(range(len(names))), [])]
    order = np.random.default_rng(seed).permutation(len(names))
    parts = np.array_split(order, folds)
    return [(sorted(int(i) for j, p in enumerate(parts) if j != k for i in p), sorted(int(i) for i in parts[k])) for k in range(folds)]


def save_manifest(out_dir: Path | str, payload: dict) -> None:
    from crossmoda_lib import __version__

    cio.write_text_atomic(Path(out_dir) / "manifest.json", json.dumps({"library_version": __version__, **payload}, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# Stage 06: training sets and k-fold ensembles
# --------------------------------------------------------------------------------------------------

STRUCTURES = {"vs": 1, "cochlea": 2}
CASE_RE = re.compile(r"crossmoda\d{4}_(ldn|etz)_\d+")
TRAINING_SETS = ("pseudo_hrT2", "pseudo_hrT2_vc", "augmented", "ceT1")


class Pair(NamedTuple):
    """One training volume: case name, image and label files, whether it is a tumour-blended volume,
    whether it is a real hrT2 (with a pseudo-label; clipped for the cochlea as the paper does)."""

    case: str
    image: Path
    label: Path
    augmented: bool = False
    real: bool = False


def training_pairs(stage03: Path | str, stage05: Path | str, structure: str, sets: list[str], stage01: Path | str | None = None) -> list[Pair]:
    """The training volumes of one structure.

    ``sets`` names stage-03 folders (``pseudo_hrT2``, ``pseudo_hrT2_vc``: every source case),
    ``augmented`` (stage-05 volumes of this structure) and/or ``ceT1`` (the stage-01 ceT1 volumes
    themselves, for the source-only ablation; needs ``stage01``). The paper: VS on
    ``pseudo_hrT2_vc`` + ``augmented``; cochlea on ``augmented`` only.
    """
    pairs = []
    for name in sets:
        if name == "augmented":
            # The volumes that stage 05's last run recorded (not whatever else lies in the folder).
            folder, suffix = Path(stage05) / "augmented", "_pseudoT2"
            record = Path(stage05) / "augmentations.csv"
            if not record.exists():
                raise cio.DataError(f"{record}: missing; run notebooks/05_tumor_blending.ipynb")
            done = pd.read_csv(record)
            images = sorted(Path(stage05) / f for f in done.file[done.structure == structure])
        elif name in ("pseudo_hrT2", "pseudo_hrT2_vc"):
            folder, suffix = Path(stage03) / name, "_pseudoT2"
            images = sorted(folder.glob("*_pseudoT2.nii.gz"))
        elif name == "ceT1":
            if stage01 is None:
                raise ValueError("training set 'ceT1' needs the stage-01 folder")
            folder, suffix = Path(stage01) / "source", "_ceT1"
            images = sorted(folder.glob("*_ceT1.nii.gz"))
        else:
            raise ValueError(f"unknown training set {name!r}: use one of {TRAINING_SETS}")
        if not images:
            raise cio.DataError(f"{folder}: no training volumes for {structure} (set {name}); run the earlier notebooks")
        for image in images:
            if not image.exists():
                raise cio.DataError(f"{image}: listed by stage 05 but missing; run notebooks/05_tumor_blending.ipynb again")
            label = image.parent / image.name.replace(suffix, "_Label")
            if not label.exists():
                raise cio.DataError(f"{label}: label of {image.name} is missing")
            pairs.append(Pair(CASE_RE.match(image.name).group(0), image, label, name == "augmented"))
    return pairs


class StructureJob(NamedTuple):
    """One structure's k-fold ensemble to train (see :func:`train_structures`).

    ``clip_percentile`` clips the *real* hrT2 volumes (``Pair.real``) at this percentile (the paper:
    95 for the cochlea); it is recorded in the manifest, and inference applies it to every real hrT2
    that this model segments.
    """

    pairs: list[Pair]
    structure: str
    cfg: SegConfig
    folds: int
    out_dir: Path
    clip_percentile: float | None = None
    init_from: Path | None = None  # a model folder whose fold k (or its only fold) starts fold k


class _FoldTask(NamedTuple):
    structure: str
    fold: int
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    cfg: SegConfig
    out_dir: Path
    clip_percentile: float | None
    device: str = "cpu"
    init_from: Path | None = None


def _fold_tasks(job: StructureJob, device: str = "cpu") -> list[_FoldTask]:
    """Folds split by case, so that a case's augmented volumes never validate a model that trained
    on the case; validation uses the un-augmented volumes of the held-out cases."""
    names = sorted({p.case for p in job.pairs})
    tasks = []
    for k, (train_idx, val_idx) in enumerate(kfold(names, job.folds, job.cfg.seed)):
        train_names = {names[i] for i in train_idx}
        val_names = {names[i] for i in val_idx}
        train_pairs = [p for p in job.pairs if p.case in train_names]
        val_pairs = [p for p in job.pairs if p.case in val_names and not p.augmented]
        init = None if job.init_from is None else warm_start_fold(job.init_from, k)
        tasks.append(_FoldTask(job.structure, k, train_pairs, val_pairs, job.cfg, Path(job.out_dir) / f"fold_{k}", job.clip_percentile, device, init))
    return tasks


def warm_start_fold(model_dir: Path | str, k: int) -> Path:
    """The fold of ``model_dir``'s ensemble that starts fold ``k`` of a warm-started one: fold ``k``
    when the ensemble has it, else its last (a one-model teacher starts every fold)."""
    folds = max(1, int(model_manifest(model_dir)["folds"]))
    return Path(model_dir) / f"fold_{min(k, folds - 1)}"


def _train_fold(task: _FoldTask, progress: bool = True) -> dict:
    """Load one fold's volumes, train (or resume, or reuse) its model; its summary row."""
    from crossmoda_lib.volumes import VolumeStore

    value = STRUCTURES[task.structure]
    # Volumes are read from disk as patches need them (crossmoda_lib.volumes): memory does not grow with the cohort.
    cache = volume_cache(task.out_dir)
    train_cases = VolumeStore(task.train_pairs, value, task.clip_percentile, cache)
    val_cases = VolumeStore(task.val_pairs, value, task.clip_percentile, cache)
    device = _WORKER_DEVICE or task.device
    _, history = train(train_cases, val_cases, task.cfg, task.out_dir, progress=progress, device=device, init_from=task.init_from)
    has_val = "val_dice" in history and history.val_dice.notna().any()
    return {
        "structure": task.structure,
        "fold": task.fold,
        "device": device,
        "train_volumes": len(task.train_pairs),
        "val_volumes": len(task.val_pairs),
        "final_loss": history.loss.iloc[-1],
        "val_dice": history.val_dice.dropna().iloc[-1] if has_val else float("nan"),
    }


def volume_cache(fold_dir: Path | str) -> Path:
    """Where a fold's volumes are unpacked (:class:`crossmoda_lib.volumes.VolumeStore`): the stage's
    (or self-training round's) folder, ``<stage>/volume_cache``, shared by its structures and folds
    and removed when their training is done."""
    return Path(fold_dir).parent.parent / "volume_cache"


#: The device of this training process when it is a pool worker (:func:`_worker_init`).
_WORKER_DEVICE: str | None = None


def _worker_init(threads: int, device_queue=None) -> None:
    """A pool worker: its share of the threads, its own device (one per GPU), and it dies with its parent."""
    global _WORKER_DEVICE
    torch.set_num_threads(threads)
    devices.die_with_parent()
    if device_queue is not None:
        import queue

        try:
            _WORKER_DEVICE = device_queue.get(timeout=5)
        except queue.Empty:  # a worker started again after one died: its task's device
            _WORKER_DEVICE = None


def _epochs_done(out_dir: Path) -> int:
    history = out_dir / "history.csv"
    return max(0, len(history.read_text().splitlines()) - 1) if history.exists() else 0


def _train_in_pool(tasks: list[_FoldTask], workers: int, progress: bool, pool_devices: list[str] | None = None) -> list[dict]:
    """Train independent models in ``workers`` fresh processes (spawned: safe from a notebook kernel
    whose thread pools are running), the machine's threads split between them. Progress is read from
    each model's ``history.csv``; the first error stops the others (their last epoch is checkpointed)
    and is raised here."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    threads = max(1, torch.get_num_threads() // workers)
    total = sum(t.cfg.epochs for t in tasks)
    bar = tqdm(total=total, desc=f"06 training {len(tasks)} models, {workers} processes x {threads} threads", disable=not progress)
    context = mp.get_context("spawn")
    device_queue = None
    if pool_devices:  # worker i trains on device i (cyclically): one process per GPU
        device_queue = context.Queue()
        for i in range(workers):
            device_queue.put(pool_devices[i % len(pool_devices)])
    pool = context.Pool(workers, initializer=_worker_init, initargs=(threads, device_queue))
    try:
        pending = [pool.apply_async(_train_fold, (task, False)) for task in tasks]
        while not all(r.ready() for r in pending):
            pending[next(i for i, r in enumerate(pending) if not r.ready())].wait(1.0)
            for r in pending:
                if r.ready() and not r.successful():
                    r.get()  # raises the worker's exception
            bar.update(sum(min(_epochs_done(t.out_dir), t.cfg.epochs) for t in tasks) - bar.n)
        rows = [r.get() for r in pending]
        bar.update(total - bar.n)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
        bar.close()
    return rows


def train_structures(jobs: list[StructureJob], *, workers: int = 1, progress: bool = True, device: str | torch.device = "cpu") -> list[pd.DataFrame]:
    """Train the k-fold ensembles of several structures; each gets its ``manifest.json``.

    Every (structure, fold) model is independent of the others. With ``workers`` > 1 the unfinished
    ones train side by side in that many processes, each with its share of the machine's threads: on
    a 2-core CPU two one-thread processes train the demo's two models 1.13x faster than one
    two-thread process trains them in turn, start-up of the processes included
    (``benchmarks/bench_segmentation.py --workers --iterations 160``). Each model stays deterministic
    for a given number of threads; models trained with other thread counts differ by float rounding.
    ``device`` is where the models train: a setting (:func:`crossmoda_lib.devices.spread`: with
    ``auto`` or ``cuda`` on a machine with several GPUs, one process per GPU, at least that many
    processes, each model on its process's GPU) or a list of devices. With one device and
    ``workers`` > 1 the processes share it. Each row says where its model trained.

    Returns:
        Per job, one row per fold: training and validation volumes, final loss, last validation Dice.
    """
    jobs = [StructureJob(*job) for job in jobs]
    # Checked here, before any process starts. Several GPUs: one training process per GPU.
    pool_devices = [str(d) for d in device] if isinstance(device, (list, tuple)) else [str(d) for d in devices.spread(device)]
    for d in pool_devices:
        devices.resolve(d)
    device = pool_devices[0]
    per_job = [_fold_tasks(job, device) for job in jobs]
    tasks = [task for group in per_job for task in group]
    todo = [i for i, t in enumerate(tasks) if _epochs_done(t.out_dir) < t.cfg.epochs]
    workers = max(1, min(max(workers, len(pool_devices)) if len(pool_devices) > 1 else workers, len(todo)))
    trained = dict(zip(todo, _train_in_pool([tasks[i] for i in todo], workers, progress, pool_devices))) if workers > 1 else {}
    # The rest in this process, in turn (finished models are only loaded).
    rows = [trained[i] if i in trained else _train_fold(t, progress=progress) for i, t in enumerate(tasks)]
    tables, remaining = [], iter(rows)
    for job, group in zip(jobs, per_job):
        table = pd.DataFrame([next(remaining) for _ in group])
        save_manifest(
            job.out_dir,
            {
                "structure": job.structure,
                "folds": job.folds,
                "settings": job.cfg.as_dict(),
                "init_from": None if job.init_from is None else str(job.init_from),
                "training_pairs": [[p.case, str(p.image), str(p.label), p.augmented, p.real] for p in job.pairs],
                "clip_percentile": job.clip_percentile,
                "summary": table.to_dict("records"),
            },
        )
        tables.append(table)
    import shutil

    for cache in sorted({volume_cache(t.out_dir) for t in tasks}):  # a finished stage needs no unpacked volumes
        shutil.rmtree(cache, ignore_errors=True)
    return tables


def train_structure(
    pairs: list[Pair], structure: str, cfg: SegConfig, folds: int, out_dir: Path | str, *, clip_percentile: float | None = None, progress: bool = True, device: str | torch.device = "cpu"
) -> pd.DataFrame:
    """Train one structure's k-fold ensemble in this process (:func:`train_structures` with one job)."""
    return train_structures([StructureJob([Pair(*p) for p in pairs], structure, cfg, folds, Path(out_dir), clip_percentile)], progress=progress, device=device)[0]


def manifest_pairs(manifest: dict, *, real: bool | None = None) -> list[Pair]:
    """The training pairs recorded in a model manifest (optionally only the real or the non-real ones)."""
    pairs = [Pair(c, Path(i), Path(lab), bool(a), bool(r)) for c, i, lab, a, r in manifest["training_pairs"]]
    return [p for p in pairs if real is None or p.real == real]


def model_manifest(model_dir: Path | str) -> dict:
    """The ``manifest.json`` of a structure's trained model folder (:func:`train_structures`)."""
    manifest_path = Path(model_dir) / "manifest.json"
    if not manifest_path.exists():
        raise cio.DataError(f"{model_dir}: no trained model (manifest.json missing)")
    return json.loads(manifest_path.read_text())


def load_ensemble(model_dir: Path | str, device: str | torch.device = "cpu") -> tuple[list[torch.nn.Module], SegConfig, dict]:
    """Every finished fold of a structure's model folder (on ``device``), its settings and manifest."""
    model_dir = Path(model_dir)
    manifest = model_manifest(model_dir)
    nets, cfg = [], None
    for k in range(manifest["folds"] if manifest["folds"] > 1 else 1):
        net, cfg = load_model(model_dir / f"fold_{k}", device)
        nets.append(net)
    return nets, cfg, manifest


def compose_label(p_vs: np.ndarray, p_cochlea: np.ndarray, keep_largest_vs: bool = True, cochlea_components: int = 0) -> np.ndarray:
    """crossMoDA label (0, 1 VS, 2 cochlea) from two probability maps thresholded at 0.5; the VS keeps
    its largest component (the paper, for every VS model); the cochlea keeps its
    ``cochlea_components`` largest components (0: all, the paper; 2: one per ear, not in the paper);
    cochlea is written over VS."""
    vs = (p_vs > 0.5).astype(np.uint8)
    if keep_largest_vs:
        vs = largest_component(vs)
    cochlea = p_cochlea > 0.5
    if cochlea_components:
        cochlea = largest_components(cochlea, cochlea_components).astype(bool)
    label = vs.copy()
    label[cochlea] = 2
    return label


def predict_label(image: np.ndarray, vs: tuple[list, SegConfig], cochlea: tuple[list, SegConfig], *, keep_largest_vs: bool = True) -> np.ndarray:
    """A crossMoDA label of a (z, y, x) volume in [0, 1] from the (networks, settings) of the VS and
    cochlea ensembles (:func:`compose_label` of their probabilities)."""
    return compose_label(predict_probabilities(vs[0], image, vs[1]), predict_probabilities(cochlea[0], image, cochlea[1]), keep_largest_vs)


def prediction_rows(
    stage01: Path | str, model_root: Path | str, centres: tuple[str, ...] = ("London", "Tilburg"), sub: str = "target", device: str | torch.device = "cpu"
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """For the first stage-01 hrT2 of each centre: (title, slice, predicted label slice, truth slice or
    None) at the slice with the largest true VS (where a miss shows), or the largest predicted VS when
    there is no truth."""
    stage01, model_root = Path(stage01), Path(model_root)
    vs = load_ensemble(model_root / "vs", device)[:2]
    cochlea = load_ensemble(model_root / "cochlea", device)[:2]
    rows = []
    for centre in centres:
        paths = [p for p in sorted((stage01 / sub).glob("*_hrT2.nii.gz")) if cio.centre_of(p.name) == centre]
        if not paths:
            continue
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[0]))).astype(np.float32)
        label = predict_label(image, vs, cochlea)
        truth_path = cio.truth_label_path(stage01, paths[0].name)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path))) if truth_path.exists() else None
        area = (truth == 1).sum(axis=(1, 2)) if truth is not None and (truth == 1).any() else (label == 1).sum(axis=(1, 2))
        z = int(area.argmax())
        rows.append((f"{centre} {paths[0].name.split('_hrT2')[0]}", image[z], label[z], truth[z] if truth is not None else None))
    return rows
