"""How realistic is the pseudo-hrT2? An "FCN score" (Isola et al., pix2pix) for stage 03.

The synthetic cohort has ground truth for every real hrT2, so a VS (or cochlea) model can be trained
*on real hrT2 with true labels* (an oracle that the method itself never has). Applied to a
pseudo-hrT2, that oracle finds the structure only where the translation made it look as it does on
hrT2; its Dice against the source labels measures the translation in the one way that matters
downstream. The oracle is also scored on the held-out real hrT2 (validation split) as the ceiling of
the score. VS predictions keep their largest component (stage 08's rule); cochlea predictions keep
both cochleae.

Side by side in one run, per case and mean: the run's ``pseudo_hrT2`` and ``pseudo_hrT2_vc`` and the
ceT1 volumes themselves (no translation: the floor), paired with their labels as stage 06 pairs them
(:func:`crossmoda_lib.segmentation.training_pairs`).

A second, model-free figure says *why* a structure is lost: its contrast, the mean intensity inside
the label minus the mean over a shell 2-3 voxels outside it (in-plane and through-plane, 6-neighbour
dilations), on the real hrT2 of ``training_target`` (with the truth) and on each translated set. On
real hrT2 the cochlea is fluid in signal-void bone, so the contrast is large; a translation that
paints the temporal bone bright leaves none, and no augmentation of the cochlea alone brings it back.

    .venv/bin/python benchmarks/bench_translation_quality.py [--run outputs/demo] [--iterations 250]
        [--structures vs cochlea]

Training one oracle takes about 3.5 minutes on 2 CPU cores (250 iterations of the demo network, Adam);
it goes to ``<run>/benchmarks/oracle_<structure>`` and is reused on the next call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from crossmoda_lib import blending, config
from crossmoda_lib import segmentation as seg


def oracle_cases(stage01: Path, split: str, structure: str) -> list[seg.Case]:
    truth = stage01 / "synthetic_truth"
    paths = sorted((stage01 / split).glob("*_hrT2.nii.gz"))
    missing = [p.name for p in paths if not (truth / p.name.replace("_hrT2", "_hrT2_Label")).exists()]
    if not paths or missing:
        raise SystemExit(f"{stage01}: needs the synthetic cohort's truth for every {split} hrT2 (missing: {missing or 'all'})")
    return [seg.load_case(p, truth / p.name.replace("_hrT2", "_hrT2_Label"), seg.STRUCTURES[structure]) for p in paths]


def oracle_config(stage01: Path, iterations: int = 250) -> seg.SegConfig:
    """The oracle's settings: the demo's VS network, Adam, ``iterations`` (a multiple of 25) on the
    real hrT2's own spacing."""
    spacing = sitk.ReadImage(str(next((stage01 / "target").glob("*_hrT2.nii.gz")))).GetSpacing()[::-1]
    return seg.SegConfig(
        spacing=tuple(round(s, 4) for s in spacing), patch_size=(24, 80, 80), base_filters=8, epochs=iterations // 25, iterations_per_epoch=25, optimizer="adam", lr=1e-3, val_every=0, mirror_tta=False
    )


def score(net, cfg: seg.SegConfig, cases: list[seg.Case], structure: str) -> list[float]:
    keep = seg.largest_component if structure == "vs" else (lambda m: m)
    return [seg.dice_score(keep(seg.predict_mask(net, c.image, cfg)), c.target) for c in cases]


def contrast(case: seg.Case) -> float:
    """Mean intensity inside the target minus the mean over the shell 2-3 voxels outside it, in image
    units (``blending.structure_levels`` with scale 1)."""
    return blending.structure_levels(case.image, case.target.astype(bool), scale=1.0)["contrast"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/demo", help="a finished run folder (stages 01 and 03)")
    parser.add_argument("--iterations", type=int, default=250, help="oracle training iterations (multiple of 25)")
    parser.add_argument("--structures", nargs="+", choices=sorted(seg.STRUCTURES), default=["vs", "cochlea"])
    args = parser.parse_args()
    run = config.resolve_path(args.run)
    stage01, stage03 = config.stage_dir(run, "01_preprocess"), config.stage_dir(run, "03_translate")
    cfg = oracle_config(stage01, args.iterations)
    for structure in args.structures:
        training = oracle_cases(stage01, "target", structure)
        t = time.perf_counter()
        net, _ = seg.train(training, [], cfg, run / "benchmarks" / f"oracle_{structure}", progress=False)
        print(f"\n{structure} oracle: {args.iterations} iterations on real hrT2 + truth, {time.perf_counter() - t:.0f} s (0 when reused)")
        validation = oracle_cases(stage01, "validation", structure)
        rows = [{"input": "real hrT2 (validation, ceiling)", "case": c.name, "dice": d} for c, d in zip(validation, score(net, cfg, validation, structure))]
        contrasts = [{"input": "real hrT2 (training_target)", "contrast": contrast(c)} for c in training]
        for name, label in (("pseudo_hrT2", "pseudo_hrT2"), ("pseudo_hrT2_vc", "pseudo_hrT2_vc"), ("ceT1", "ceT1 (no translation, floor)")):
            pairs = seg.training_pairs(stage03, None, structure, [name], stage01=stage01)
            cases = [seg.load_case(p.image, p.label, seg.STRUCTURES[structure]) for p in pairs]
            rows += [{"input": label, "case": c.name, "dice": d} for c, d in zip(cases, score(net, cfg, cases, structure))]
            contrasts += [{"input": label, "contrast": contrast(c)} for c in cases]
        table = pd.DataFrame(rows)
        print(table.pivot_table(index="case", columns="input", values="dice").round(3).to_string())
        print(f"\nmean {structure} Dice of the hrT2 oracle:")
        print(table.groupby("input", sort=False).dice.agg(["mean", "std", "count"]).round(3).to_string())
        print(f"\n{structure} contrast (inside minus the 2-3 voxel shell, intensities in [0, 1]):")
        print(pd.DataFrame(contrasts).groupby("input", sort=False).contrast.agg(["mean", "std", "count"]).round(3).to_string())


if __name__ == "__main__":
    main()
