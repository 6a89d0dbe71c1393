"""Is the demo's translation a draw? Several stage-02 CycleGANs of one profile, scored side by side.

A GAN trained for a few thousand iterations is a draw: the seed, the CPU's kernel family (AVX-512,
AVX2) and the thread count each give another training path (``bench_reproducibility.py``). One
run of the pipeline says little about its settings; this script says how often they work. It
trains one CycleGAN per (seed, kernel family) with the 02_cyclegan settings of a profile (``--set``
overrides any of them), two at a time in spawned one-thread processes, translates every stage-01
ceT1 volume with each, and prints per draw:

* ``vs_oracle``: the translation score of ``bench_translation_quality.py``, the Dice of a VS model
  trained on *real* hrT2 with the synthetic truth, applied to the pseudo-hrT2 (largest component),
  mean over the source cases. The same oracle on held-out real hrT2 is the ceiling;
* ``vs_contrast`` and ``cochlea_contrast``: mean inside the label minus the mean of the shell 2-3
  voxels outside it (intensities in [0, 1]), model-free; the real hrT2's values are printed beside;
* ``vs_level``: the mean intensity inside the VS divided by the 99th percentile of the slice
  volume, where real hrT2 puts the tumour at about half the CSF. A CycleGAN caught near the
  identity mapping leaves the enhancing tumour CSF-bright (near 1); one that takes it for an
  enhancing vessel (a flow void on hrT2) paints it dark (near 0.1).

    .venv/bin/python benchmarks/bench_cyclegan_draws.py [--run outputs/demo] [--profile params/demo.yaml]
        [--seeds 0 1 2] [--kernels default avx2] [--set lambda_identity=0 n_blocks=9] [--workers 2]

Needs stage 01 of ``--run``. Draws go to ``<run>/benchmarks/cyclegan_draws/<settings>/<seed>_<kernels>``
and are reused (or resumed) on the next call; the oracle is ``<run>/benchmarks/oracle_vs`` (about
2 minutes to train the first time). One demo draw takes about 10 minutes on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmarks below, also in spawned children

from bench_reproducibility import AVX2, start_with_env  # noqa: E402

KERNELS = {"default": {}, "avx2": AVX2}


def oracle(run: Path):
    """The VS oracle of bench_translation_quality.py (trained once, then reused)."""
    import bench_translation_quality as btq

    from crossmoda_lib import segmentation as seg

    stage01 = run / "01_preprocess"
    cfg = btq.oracle_config(stage01)
    net, _ = seg.train(btq.oracle_cases(stage01, "target", "vs"), [], cfg, run / "benchmarks" / "oracle_vs", progress=False)
    return net, cfg, btq


def level(image, label) -> float:
    from crossmoda_lib import blending

    return blending.structure_levels(image, label)["level"]


def references(run: Path) -> dict:
    """The oracle's ceiling and the contrasts of real hrT2 (training_target, with the truth)."""
    import numpy as np

    net, cfg, btq = oracle(run)
    stage01 = run / "01_preprocess"
    validation = btq.oracle_cases(stage01, "validation", "vs")
    vs = btq.oracle_cases(stage01, "target", "vs")
    cochlea = btq.oracle_cases(stage01, "target", "cochlea")
    return {
        "vs_oracle": float(np.mean(btq.score(net, cfg, validation, "vs"))),
        "vs_contrast": float(np.mean([btq.contrast(c) for c in vs])),
        "cochlea_contrast": float(np.mean([btq.contrast(c) for c in cochlea])),
        "vs_level": float(np.mean([level(c.image, c.target.astype(bool)) for c in vs])),
        "n": len(validation),
    }


def scores(generator, run_path: Path, cfg, net, ocfg, btq) -> dict:
    """Every score of one generator on the stage-01 source volumes (means; per-case oracle)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from crossmoda_lib import segmentation as seg
    from crossmoda_lib import translation as tr

    stage01 = run_path / "01_preprocess"
    rows = []
    for path in sorted((stage01 / "source").glob("*_ceT1.nii.gz")):
        image = sitk.ReadImage(str(path))
        with torch.no_grad():
            pseudo = tr.translate_array(generator, sitk.GetArrayFromImage(image).astype(np.float32), cfg.image_size)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_ceT1", "_Label")))
        vs = seg.Case(path.name, pseudo, (labels == 1).astype(np.uint8))
        cochlea = seg.Case(path.name, pseudo, (labels == 2).astype(np.uint8))
        rows.append({
            "vs_oracle": btq.score(net, ocfg, [vs], "vs")[0],
            "vs_contrast": btq.contrast(vs),
            "cochlea_contrast": btq.contrast(cochlea) if cochlea.target.any() else float("nan"),
            "vs_level": level(pseudo, labels == 1),
            **{k: v for k, v in tr.vs_measures(pseudo, labels == 1, image.GetSpacing()[::-1]).items() if k != "vs_level"},
        })
    means = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    return {"per_case_vs_oracle": [round(r["vs_oracle"], 2) for r in rows], **means}


def draw(run: str, settings: dict, centres: list, min_anatomy_fraction: float, out: str, screen_epochs: list, queue) -> None:
    """One CycleGAN (in a spawned one-thread process), scored at each of ``screen_epochs`` (the
    training stops there, is scored, and resumes exactly) and at the end. The result is kept in
    ``<out>/result.json`` and returned from there on the next call."""
    import torch

    from crossmoda_lib import translation as tr

    torch.set_num_threads(1)
    run_path, out_path = Path(run), Path(out)
    saved = out_path / "result.json"
    if saved.exists() and json.loads(saved.read_text()).get("screen_epochs") == screen_epochs:
        queue.put(json.loads(saved.read_text()))
        return
    stage01 = run_path / "01_preprocess"
    cfg = tr.CycleGANConfig.from_dict(settings)
    net, ocfg, btq = oracle(run_path)
    n_slices = tr.collect_slices(tr.stage_volumes(stage01, "source", "ceT1", centres), cfg.image_size, min_anatomy_fraction=min_anatomy_fraction).shape[0]
    steps = tr.epoch_steps(n_slices, cfg)
    t0, checkpoints = time.perf_counter(), []
    for epoch in sorted(set(screen_epochs)):
        nets, _, _ = tr.train_stage(stage01, out_path, cfg, centres, min_anatomy_fraction=min_anatomy_fraction, progress=False, stop_after=epoch * steps)
        checkpoints.append({"epoch": epoch, **scores(nets.G_A, run_path, cfg, net, ocfg, btq)})
        torch.save(nets.G_A.state_dict(), out_path / f"G_A_epoch{epoch}.pt")  # for criteria tried later
    nets, history, _ = tr.train_stage(stage01, out_path, cfg, centres, min_anatomy_fraction=min_anatomy_fraction, progress=False)
    seconds = time.perf_counter() - t0
    result = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "train_s": seconds,
        "iterations": int(history.iteration.iloc[-1]) if len(history) else 0,
        "screen_epochs": screen_epochs,
        "checkpoints": checkpoints,
        **scores(nets.G_A, run_path, cfg, net, ocfg, btq),
    }
    from crossmoda_lib import io as cio

    cio.write_text_atomic(saved, json.dumps(result, indent=2) + "\n")
    queue.put(result)


def settings_from_profile(profile_path: Path, overrides: list[str]):
    """The profile's 02_cyclegan section with the overrides: (that section as given, the
    CycleGANConfig it makes, centres, min_anatomy_fraction)."""
    from crossmoda_lib import config
    from crossmoda_lib import translation as tr

    section = dict(config.load_profile(profile_path)["notebooks"].get("02_cyclegan", {}))
    for item in overrides:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--set {item!r}: use key=value")
        section[key] = json.loads(value)
    centres = section.pop("centres", ["London"])
    min_anatomy_fraction = float(section.pop("min_anatomy_fraction", 0.1))
    known = {f.name for f in fields(tr.CycleGANConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise SystemExit(f"not CycleGAN settings: {unknown}; known: {sorted(known)}")
    if not section.get("random_crop"):
        section["random_crop"] = None
    section["image_size"] = list(section["image_size"]) if section.get("image_size") else None
    cfg = tr.CycleGANConfig.from_dict({**tr.CycleGANConfig().as_dict(), **section})  # checks the values now
    return section, cfg, centres, min_anatomy_fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="outputs/demo", help="a run folder with stage 01")
    ap.add_argument("--profile", default="params/demo.yaml", help="the 02_cyclegan settings come from here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["default"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override 02_cyclegan settings (JSON values)")
    ap.add_argument("--workers", type=int, default=2, help="draws trained at once (one thread each)")
    ap.add_argument("--screen-epochs", type=int, nargs="*", default=[], help="also score each draw after these epochs (the draw gate's screen, 02_cyclegan.draw_epochs)")
    args = ap.parse_args()

    from crossmoda_lib import config

    run = config.resolve_path(args.run)
    config.require_stage(run / "01_preprocess", "01_preprocess")
    section, cfg, centres, anatomy = settings_from_profile(config.resolve_path(args.profile), args.set)
    tag = hashlib.sha256(json.dumps([section, centres, anatomy], sort_keys=True).encode()).hexdigest()[:8]
    root = run / "benchmarks" / "cyclegan_draws" / tag
    ref = references(run)  # trains the oracle once, before the draws share it
    jobs = []
    for kernels in args.kernels:
        for seed in args.seeds:
            jobs.append((kernels, seed, replace(cfg, seed=seed).as_dict(), str(root / f"seed{seed}_{kernels}")))
    print(f"{len(jobs)} draws of the 02_cyclegan settings of {args.profile} {' '.join(args.set)} (folder {root}), {args.workers} at a time, one thread each", flush=True)
    ctx = mp.get_context("spawn")
    results, running = [], []
    pending = list(jobs)
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.workers:
            kernels, seed, settings, out = pending.pop(0)
            queue = ctx.Queue()
            proc = start_with_env(ctx, KERNELS[kernels], draw, (str(run), settings, centres, anatomy, out, args.screen_epochs, queue))
            running.append((kernels, seed, proc, queue))
        kernels, seed, proc, queue = running.pop(0)
        result = queue.get()
        proc.join()
        results.append({"seed": seed, "kernels": kernels, **result})
        print(f"  seed {seed} ({kernels}): translation score {result['vs_oracle']:.3f} after {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{'seed':>4} {'kernels':>8} {'cpu':>8} {'train s':>8} {'iter':>6} {'vs_oracle':>10} {'vs_level':>9} {'vs_contrast':>12} {'cochlea_contrast':>17}  per-case vs_oracle")
    for r in results:
        print(
            f"{r['seed']:>4} {r['kernels']:>8} {r['capability']:>8} {r['train_s']:>8.0f} {r['iterations']:>6} {r['vs_oracle']:>10.3f} "
            f"{r['vs_level']:>9.2f} {r['vs_contrast']:>12.3f} {r['cochlea_contrast']:>17.3f}  {r['per_case_vs_oracle']}"
        )
    print(
        f"{'real hrT2':>31} {'':>6} {ref['vs_oracle']:>10.3f} {ref['vs_level']:>9.2f} {ref['vs_contrast']:>12.3f} {ref['cochlea_contrast']:>17.3f}  (oracle: {ref['n']} validation hrT2, the ceiling)"
    )
    if args.screen_epochs:
        print("\nthe draw gate's criterion (vs_band_dice: real hrT2 about 0.65, identity 0) / vs_csf_contrast / the translation score, per epoch:")
        print(f"{'seed':>6} " + " ".join(f"{'epoch ' + str(c['epoch']):>20}" for c in results[0]["checkpoints"]) + f" {'end':>20}")
        for r in results:
            cells = [f"{c.get('vs_band_dice', float('nan')):.2f} / {c['vs_csf_contrast']:+.2f} / {c['vs_oracle']:.2f}" for c in r["checkpoints"] + [r]]
            print(f"{r['seed']:>6} " + " ".join(f"{c:>20}" for c in cells))
        out_csv = root / "screen.csv"
        flat = [
            {"seed": r["seed"], "kernels": r["kernels"], "epoch": c["epoch"], **{k: v for k, v in c.items() if k != "per_case_vs_oracle"}}
            for r in results
            for c in r["checkpoints"] + [{"epoch": "end", **{k: r.get(k) for k in ("vs_oracle", "vs_contrast", "cochlea_contrast", "vs_level", "vs_csf_contrast", "vs_band_dice")}}]
        ]
        import pandas as pd

        pd.DataFrame(flat).to_csv(out_csv, index=False)
        print(f"(written to {out_csv})")
    usable = sum(r["vs_oracle"] >= 0.3 for r in results)
    print(f"\ndraws with a translation score >= 0.3: {usable} of {len(results)}")


if __name__ == "__main__":
    main()
