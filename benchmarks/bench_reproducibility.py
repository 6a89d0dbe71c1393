"""Same seed, same numbers? The stage-02 CycleGAN under different CPU kernels and thread counts.

Every stage seeds its random numbers, so a run repeats itself exactly on one machine. Across
machines it need not: PyTorch and oneDNN pick the widest vector kernels the CPU offers (AVX-512 on
recent x86 CPUs, AVX2 on older ones), and the number of threads splits reductions differently.
Both change float rounding, and a GAN amplifies rounding into another training path.

This script trains the demo's CycleGAN from the same seed on the same stage-01 slices for a few
iterations in fresh processes, one per setting, and prints side by side: the CPU kernel family in
force, threads, seconds per iteration, the last logged losses, a checksum of the ceT1 -> hrT2
generator's weights, and whether it equals the first row's. The first two rows repeat one setting
(they must agree: the run is deterministic on one machine).

    .venv/bin/python benchmarks/bench_reproducibility.py [--run outputs/demo] [--iterations 100]

Measured on the demo (docs/experiments.md): the full 6600 iterations under AVX-512 and under
AVX2 kernels gave translations that a VS oracle scores 0.04 and 0.33.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import time
from dataclasses import replace
from pathlib import Path

#: The environment that makes torch and oneDNN use AVX2 kernels on a CPU that has AVX-512.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

SETTINGS = [
    ("machine default", {}, 2),
    ("machine default", {}, 2),
    ("AVX2", AVX2, 2),
    ("machine default", {}, 1),
]


def start_with_env(ctx, env: dict, target, args: tuple):
    """Start a spawned process with ``env`` added to its environment (the child's torch reads the
    kernel variables at its first kernel); this process's environment is left as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = ctx.Process(target=target, args=args)
        proc.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return proc


def train(run: str, iterations: int, threads: int, queue) -> None:
    import json
    import tempfile

    import torch

    from crossmoda_lib import config
    from crossmoda_lib import translation as tr

    torch.set_num_threads(threads)
    stage02 = config.stage_dir(run, "02_cyclegan")
    settings = json.loads((stage02 / "config.json").read_text())
    cfg = tr.CycleGANConfig.from_dict(settings)
    cfg = replace(cfg, log_every=min(cfg.log_every, iterations), checkpoint_every=10**9)
    stage01 = config.stage_dir(run, "01_preprocess")
    made = json.loads((stage02 / "manifest.json").read_text())  # the run's own centres and slice rule
    anatomy = {"min_anatomy_fraction": made["min_anatomy_fraction"]}
    slices_a = tr.collect_slices(tr.stage_volumes(stage01, "source", "ceT1", made["centres"]), cfg.image_size, **anatomy)
    slices_b = tr.collect_slices(tr.stage_volumes(stage01, "target", "hrT2", made["centres"]), cfg.image_size, **anatomy)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        nets, history = tr.train_cyclegan(slices_a, slices_b, cfg, tmp, stop_after=iterations, progress=False)
        seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in nets.G_A.state_dict().values())).hexdigest()[:12]
    last = history.iloc[-1]
    queue.put(
        dict(capability=torch.backends.cpu.get_cpu_capability(), threads=threads, s_per_iter=seconds / iterations, G_A=float(last.G_A), cycle_A=float(last.cycle_A), D_A=float(last.D_A), digest=digest)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="outputs/demo", help="a run whose stages 01 and 02 exist (the CycleGAN settings come from 02)")
    ap.add_argument("--iterations", type=int, default=100)
    args = ap.parse_args()
    if not (Path(args.run) / "02_cyclegan" / "config.json").exists():
        raise SystemExit(f"{args.run}: run stages 01-02 first (./run_all.sh --only 01_preprocess 02_cyclegan)")
    ctx = mp.get_context("spawn")
    rows = []
    for name, env, threads in SETTINGS:
        queue = ctx.Queue()
        proc = start_with_env(ctx, env, train, (args.run, args.iterations, threads, queue))
        rows.append(dict(setting=name, **queue.get()))
        proc.join()
    print(f"demo CycleGAN, seed from {args.run}/02_cyclegan/config.json, {args.iterations} iterations per row")
    print(f"{'setting':16} {'kernels':>8} {'threads':>7} {'s/iter':>7} {'G_A':>9} {'cycle_A':>9} {'D_A':>9} {'G_A weights':>13} {'= row 1':>8}")
    for r in rows:
        same = "yes" if r["digest"] == rows[0]["digest"] else "no"
        print(f"{r['setting']:16} {r['capability']:>8} {r['threads']:7d} {r['s_per_iter']:7.3f} {r['G_A']:9.5f} {r['cycle_A']:9.5f} {r['D_A']:9.5f} {r['digest']:>13} {same:>8}")


if __name__ == "__main__":
    main()
