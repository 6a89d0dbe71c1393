"""Stage 04-05 timings: SinGAN iteration time per scale, whole training, harmonization per volume.

Prints, in one run: for the smoke and demo settings (on the demo's 144 x 176 slice), the seconds per
training iteration at every scale (measured over a few iterations), the extrapolated training time
for the setting's iteration count, and the time to harmonize one VS and one cochlea volume; the paper
setting's per-iteration time at its finest scales on the CPU (and on a GPU when one is available:
``--device cuda`` is accepted but this implementation runs on the CPU only).

    .venv/bin/python benchmarks/bench_singan.py [--iterations 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np
import SimpleITK as sitk
import torch

from crossmoda_lib import blending as bl
from crossmoda_lib import singan as sg

SETTINGS = {
    "smoke": sg.SinGANConfig(scale_factor=0.7, min_size=16, max_size=44, ker_size=3, nfc=8, niter=20),
    "demo": sg.SinGANConfig(scale_factor=0.75, min_size=20, max_size=88, ker_size=3, nfc=16, niter=150),
    "paper": sg.SinGANConfig(),
}


def slice_image(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return (0.5 * torch.sin(9 * xx) * torch.cos(7 * yy) + 0.3 * ((xx**2 + yy**2) < 0.2)).clamp(-1, 1)[None, None]


def per_scale_times(image: torch.Tensor, cfg: sg.SinGANConfig, iterations: int, scales: list[int] | None = None) -> tuple[sg.SinGANModel, dict[int, float]]:
    """Train every scale with ``iterations`` iterations, timing each (the pyramid below a scale must
    exist for the next, so all scales are trained, briefly)."""
    quick = replace(cfg, niter=iterations)
    pyramid = sg.pyramid_for(image.shape[-2], image.shape[-1], quick)
    model = sg.SinGANModel(quick, pyramid, reals=sg.image_pyramid(image, pyramid))
    times, prev = {}, None
    for n in range(pyramid.n_scales):
        t0 = time.perf_counter()
        g, d, _ = sg.train_scale(model, n, progress=False, prev_state=prev)
        times[n] = (time.perf_counter() - t0) / iterations
        prev = (g.state_dict(), d.state_dict())
        if scales is not None and n >= max(scales):
            break
    return model, times


def volume(shape=(44, 144, 176)) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(0)
    arr = np.clip(0.4 + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    lab[((zz - 22) / 8.0) ** 2 + ((yy - 70) / 12.0) ** 2 + ((xx - 100) / 12.0) ** 2 < 1] = 1  # ~2400 mm3 at 0.6x0.6x1
    lab[((zz - 20) / 2.5) ** 2 + ((yy - 60) / 4.0) ** 2 + ((xx - 40) / 4.0) ** 2 < 1] = 2
    image, label = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(lab)
    image.SetSpacing((0.6, 0.6, 1.0))
    label.CopyInformation(image)
    return image, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    image = slice_image(144, 176)
    vol, lab = volume()
    for name in ("smoke", "demo"):
        cfg = SETTINGS[name]
        model, times = per_scale_times(image, cfg, args.iterations)
        sizes = model.pyramid.sizes
        print(f"\n{name}: {model.pyramid.n_scales} scales {sizes[0]} .. {sizes[-1]}, ker {cfg.ker_size}, nfc {cfg.nfc}, {cfg.niter} iterations per scale")
        print("  s/iter per scale: " + ", ".join(f"{n}: {t:.3f}" for n, t in times.items()))
        total = sum(times.values()) * cfg.niter
        print(f"  whole training (extrapolated): {total / 60:.1f} min")
        n_top = model.pyramid.n_scales - 1
        for structure, value in (("vs", 1), ("cochlea", 2)):
            n_slices = int((sitk.GetArrayViewFromImage(lab) == value).any(axis=(1, 2)).sum())
            t0 = time.perf_counter()
            bl.blend_volume(vol, lab, bl.BlendParams(structure, 1.5, max(1, n_top - 2), seed=0), model)
            print(f"  harmonize one {structure} volume ({n_slices} slices, start scale {max(1, n_top - 2)}): {time.perf_counter() - t0:.2f} s")
    paper = SETTINGS["paper"]
    p = sg.pyramid_for(256, 256, paper)
    print(f"\npaper: {p.n_scales} scales {p.sizes[0]} .. {p.sizes[-1]}, ker 5, nfc 32..128, 2000 iterations per scale")
    with tempfile.TemporaryDirectory():
        _, times = per_scale_times(slice_image(256, 256), paper, 1, scales=[2])
    print("  s/iter at the three coarsest scales on the CPU: " + ", ".join(f"{n}: {t:.3f}" for n, t in times.items()))
    print("  (finer scales cost more: each critic step regenerates every coarser scale; run it on a GPU)")


if __name__ == "__main__":
    main()
