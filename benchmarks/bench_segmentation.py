"""Stage 06-08 costs: training step time and peak memory, sliding-window inference per case.

For the smoke, demo and paper settings of ``params/*.yaml`` (the same DynUNet, planned by
:func:`crossmoda_lib.segmentation.plan_network`), each measured in a fresh child process so that its
peak resident memory (``ru_maxrss``) is its own, this prints side by side:

* seconds per training iteration (forward + deep-supervised Dice+CE + backward + SGD step, batch of
  the setting, augmentation excluded) over a few iterations after one warm-up;
* peak resident memory of the process (MiB);
* sliding-window inference of one case (Gaussian weighting, the setting's overlap, with and without
  8-fold mirroring; for the paper setting on a CPU the mirrored time is 8x the plain one, not
  measured) on a volume of the stage-01 size of that profile;
* the extrapolated time of one epoch and of a whole training;
* with ``--layouts channels_last contiguous``, each setting in both memory layouts side by side
  (the library builds channels-last 3D networks: ``segmentation.CHANNELS_LAST``), with the ratio;
* with ``--workers``, the wall time of training the demo's two models (VS and cochlea) through
  :func:`crossmoda_lib.segmentation.train_structures` in turn in this process and side by side in
  two processes (stage 06/07 ``workers``), on the same volumes, with the ratio.

papers/004 reports 27 s and 5.4 GB per case for GPU inference of the paper's ensemble; on a GPU
(``--device cuda`` when one is present) the paper row is measured there too.

    .venv/bin/python benchmarks/bench_segmentation.py [--iterations 3] [--only smoke demo]
        [--layouts channels_last contiguous] [--workers]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from dataclasses import replace

import numpy as np
import torch

from crossmoda_lib import segmentation as seg

# (setting, patch (z,y,x), base filters, batch, stage-01 volume (z,y,x), overlap, epochs x iterations)
SETTINGS = {
    "smoke": dict(patch_size=(16, 64, 64), base_filters=4, batch_size=2, volume=(44, 144, 176), overlap=0.25, epochs=2, iterations=3),
    "demo": dict(patch_size=(24, 80, 80), base_filters=8, batch_size=2, volume=(44, 144, 176), overlap=0.5, epochs=8, iterations=20),
    "paper": dict(patch_size=(64, 160, 160), base_filters=32, batch_size=2, volume=(80, 256, 256), overlap=0.5, epochs=500, iterations=250),
}


LAYOUTS = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}


def measure(name: str, layout: str, iterations: int, device: str, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    seg.CHANNELS_LAST = LAYOUTS[layout]  # this child process only: network, training inputs, inference windows
    s = SETTINGS[name]
    cfg = seg.SegConfig(spacing=(1.0, 0.6, 0.6), patch_size=s["patch_size"], base_filters=s["base_filters"], batch_size=s["batch_size"], overlap=s["overlap"], mirror_tta=False)
    net = seg.build_network(cfg).to(device)
    opt = seg.make_optimizer(net, cfg)
    loss_fn = seg.make_loss()
    rng = np.random.default_rng(0)
    patch = cfg.plan.patch_size
    x = torch.as_tensor(rng.random((cfg.batch_size, 1, *patch), dtype=np.float32), device=device).contiguous(memory_format=seg.CHANNELS_LAST)
    y = torch.as_tensor((rng.random((cfg.batch_size, 1, *patch)) > 0.9).astype(np.float32), device=device)

    def step() -> None:
        out = net(x)
        w = seg.deep_supervision_weights(out.shape[1]) if out.dim() == 6 else [1.0]
        loss = sum(wi * loss_fn(out[:, i] if out.dim() == 6 else out, y) for i, wi in enumerate(w))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    step_s = (time.perf_counter() - t0) / iterations
    net.eval()
    volume = rng.random(s["volume"], dtype=np.float32)
    t0 = time.perf_counter()
    seg.predict_probabilities(net, volume, cfg)
    infer_s = time.perf_counter() - t0
    if name == "paper" and device == "cpu":
        infer_tta_s = 8 * infer_s  # 8 mirrorings = 8 passes; measuring it would take most of an hour on a CPU
    else:
        t0 = time.perf_counter()
        seg.predict_probabilities(net, volume, replace(cfg, mirror_tta=True))
        infer_tta_s = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    params = sum(p.numel() for p in net.parameters())
    queue.put(
        dict(
            setting=name,
            layout=layout,
            patch="x".join(map(str, patch)),
            params=params,
            step_s=step_s,
            peak_mib=peak_mib,
            gpu_mib=gpu_mib,
            infer_s=infer_s,
            infer_tta_s=infer_tta_s,
            epoch_s=step_s * s["iterations"],
            training_h=step_s * s["iterations"] * s["epochs"] / 3600,
        )
    )


def compare_workers(iterations: int) -> None:
    """Two demo models trained in turn, then side by side (``workers`` 1 and 2), on random volumes of
    the demo's stage-01 size; every model trains ``iterations`` iterations (2 epochs)."""
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    s = SETTINGS["demo"]
    cfg = seg.SegConfig(
        spacing=(1.0, 0.6, 0.6),
        patch_size=s["patch_size"],
        base_filters=s["base_filters"],
        batch_size=s["batch_size"],
        epochs=2,
        iterations_per_epoch=max(1, iterations // 2),
        optimizer="adam",
        lr=1e-3,
        val_every=0,
        mirror_tta=False,
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = []
        for k in range(3):
            name = f"crossmoda2022_ldn_{k + 1:03d}"
            label = np.zeros(s["volume"], dtype=np.uint8)
            label[18:26, 60:80, 70:90] = 1
            label[20:24, 60:66, 30:36] = 2
            image = (rng.random(s["volume"], dtype=np.float32) * 0.5 + 0.4 * (label > 0)).astype(np.float32)
            pairs.append(seg.Pair(name, root / f"{name}_T2.nii.gz", root / f"{name}_Label.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(image), str(pairs[-1].image))
            sitk.WriteImage(sitk.GetImageFromArray(label), str(pairs[-1].label))
        times = {}
        for workers in (1, 2):
            jobs = [seg.StructureJob(pairs, structure, cfg, 1, root / f"workers_{workers}" / structure) for structure in ("vs", "cochlea")]
            t0 = time.perf_counter()
            seg.train_structures(jobs, workers=workers, progress=False)
            times[workers] = time.perf_counter() - t0
    n = 2 * cfg.epochs * cfg.iterations_per_epoch
    print(f"demo setting, 2 models x {n // 2} iterations, {torch.get_num_threads()} threads on the machine (process start-up included)")
    for workers, t in times.items():
        how = "in turn, one process" if workers == 1 else f"side by side, {workers} processes x {max(1, torch.get_num_threads() // workers)} threads"
        print(f"  workers {workers} ({how}): {t:7.1f} s, {t / n:.3f} s per iteration")
    print(f"  side by side / in turn: x{times[2] / times[1]:.2f} time ({times[1] / times[2]:.2f}x faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["channels_last"], help="memory layouts to measure (the first is the library's)")
    ap.add_argument("--workers", action="store_true", help="only compare training two demo models in turn and side by side")
    args = ap.parse_args()
    if args.workers:
        compare_workers(max(args.iterations, 40))
        return
    ctx = mp.get_context("spawn")
    rows = []
    for name in args.only:
        for layout in args.layouts:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(name, layout, args.iterations, args.device, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; volumes: stage-01 size of each profile (paper 256x256x80)")
    print(f"{'setting':8} {'layout':>13} {'patch':>11} {'params':>10} {'s/iter':>8} {'peak MiB':>9} {'GPU MiB':>8} {'infer s':>8} {'infer+TTA s':>12} {'s/epoch':>9} {'training h':>11}")
    for r in rows:
        print(
            f"{r['setting']:8} {r['layout']:>13} {r['patch']:>11} {r['params']:>10,} {r['step_s']:8.3f} "
            f"{r['peak_mib']:9.0f} {r['gpu_mib']:8.0f} {r['infer_s']:8.2f} {r['infer_tta_s']:12.2f} {r['epoch_s']:9.1f} {r['training_h']:11.2f}"
        )
    first = [r for r in rows if r["layout"] == args.layouts[0]]
    base = first[0]
    print("ratios to " + base["setting"] + ": " + ", ".join(f"{r['setting']} step x{r['step_s'] / base['step_s']:.1f}, inference x{r['infer_s'] / base['infer_s']:.1f}" for r in first[1:]))
    for r in rows:
        if r["layout"] != args.layouts[0]:
            ref = next(f for f in first if f["setting"] == r["setting"])
            print(f"{r['setting']}: {r['layout']} / {ref['layout']}: step x{r['step_s'] / ref['step_s']:.2f}, inference x{r['infer_s'] / ref['infer_s']:.2f}")
    print("papers/004: 27 s and 5.4 GB per case for GPU inference of the paper's ensemble (5 folds, TTA)")


if __name__ == "__main__":
    main()
