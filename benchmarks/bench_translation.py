"""Stage 02-03 timings: Van Cittert closed form vs the plain loop, CycleGAN iteration time and memory.

Prints, in one run: the Van Cittert deconvolution of a 256 x 256 x 80 volume (15 iterations, the
paper's VS PSF on the 0.6 x 0.6 x 1.0 mm grid) by the plain loop and by the DCT closed form, with
their ratio and agreement; then one CycleGAN training iteration (batch 1) at the smoke, demo and
paper settings: seconds per iteration and peak resident memory of a fresh process, on the CPU (and
on a GPU when one is available: ``--device cuda``).

    .venv/bin/python benchmarks/bench_translation.py [--iterations 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

SETTINGS = {
    "smoke": {"ngf": 8, "n_blocks": 2, "image_size": (72, 88)},
    "demo": {"ngf": 8, "n_blocks": 4, "image_size": (144, 176)},
    "paper": {"ngf": 64, "n_blocks": 9, "image_size": (256, 256)},
}


def bench_van_cittert() -> None:
    from scipy import ndimage

    from crossmoda_lib import deconvolution as dc

    y = ndimage.gaussian_filter(np.random.default_rng(0).random((80, 256, 256)), 2.0).astype(np.float32)
    sigma = dc.psf_sigma_voxels((1.0, 1.0, 2.5), (0.6, 0.6, 1.0))[::-1]
    t0 = time.perf_counter()
    dc.van_cittert(y, sigma, 15)
    first = time.perf_counter() - t0
    fast = min(_timed(lambda: dc.van_cittert(y, sigma, 15)) for _ in range(5))
    loop = _timed(lambda: dc.van_cittert_loop(y, sigma, 15))
    err = np.abs(dc.van_cittert(y, sigma, 15) - dc.van_cittert_loop(y, sigma, 15)).max() / np.abs(y).max()
    print("Van Cittert, 256x256x80, 15 iterations, PSF sigma 1x1x2.5 mm on 0.6x0.6x1.0 mm:")
    print(f"  plain loop (scipy.ndimage, float64): {loop * 1000:8.0f} ms")
    print(f"  closed form (DCT, float32)         : {fast * 1000:8.0f} ms   (first call, building the cached filter: {first * 1000:.0f} ms)")
    print(f"  ratio loop/closed form             : {loop / fast:8.1f}x   max relative difference {err:.1e}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(setting: str, iterations: int, device: str) -> None:
    """Runs in a fresh process: peak memory belongs to this setting alone."""
    import resource

    import torch

    from crossmoda_lib import translation as tr

    spec = SETTINGS[setting]
    cfg = tr.CycleGANConfig(ngf=spec["ngf"], ndf=spec["ngf"] if setting != "demo" else 8, n_blocks=spec["n_blocks"], image_size=spec["image_size"])
    nets = tr.CycleGAN.build(cfg)
    for net in nets.modules():
        net.to(device)
    opt_g = torch.optim.Adam([*nets.G_A.parameters(), *nets.G_B.parameters()], lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam([*nets.D_A.parameters(), *nets.D_B.parameters()], lr=cfg.lr, betas=(cfg.beta1, 0.999))
    pool_a, pool_b = tr.ImagePool(cfg.pool_size, 0), tr.ImagePool(cfg.pool_size, 1)
    a = torch.rand(1, 1, *spec["image_size"], device=device) * 2 - 1
    b = torch.rand(1, 1, *spec["image_size"], device=device) * 2 - 1
    tr.train_step(nets, a, b, opt_g, opt_d, pool_a, pool_b, cfg)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iterations):
        tr.train_step(nets, a, b, opt_g, opt_d, pool_a, pool_b, cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    per_iter = (time.perf_counter() - t0) / iterations
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in nets.G_A.parameters())
    print(json.dumps({"setting": setting, "s_per_iter": per_iter, "peak_mb": peak, "generator_params": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.iterations, args.device)
        return
    bench_van_cittert()
    print(f"\nCycleGAN, one training iteration (batch 1, both generators and discriminators), device {args.device}:")
    print(f"{'setting':<8}{'ngf':>5}{'blocks':>8}{'slice':>10}{'G params':>11}{'s/iter':>9}{'peak MB':>10}{'x smoke':>9}")
    base = None
    for setting, spec in SETTINGS.items():
        run = subprocess.run([sys.executable, __file__, "--child", setting, "--iterations", str(args.iterations), "--device", args.device], capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        base = base or r["s_per_iter"]
        size = "x".join(map(str, spec["image_size"]))
        print(f"{setting:<8}{spec['ngf']:>5}{spec['n_blocks']:>8}{size:>10}{r['generator_params'] / 1e6:>10.2f}M{r['s_per_iter']:>9.3f}{r['peak_mb']:>10.0f}{r['s_per_iter'] / base:>8.1f}x")
    print("(peak MB: resident memory of the whole process on the CPU; allocated GPU memory with --device cuda)")


if __name__ == "__main__":
    main()
