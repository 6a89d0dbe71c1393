"""Foundation timings: synthetic cohort generation, validation per file, preprocessing per case.

Prints, in one run: cohort generation time (ROI field of view, 16 cases), validation time per file,
and stage-01 time per case for the ROI and the head field of view, with the direct-to-crop-grid
resampling against resample-then-crop measured side by side (same images, same process).

    .venv/bin/python benchmarks/bench_foundation.py [--cases-per-centre 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from crossmoda_lib import io as cio
from crossmoda_lib import preprocess as pp
from crossmoda_lib import synth


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_preprocess(paths: list[Path], cfg: pp.PreprocessConfig, repeats: int) -> dict[str, float]:
    """Mean per-case seconds: the resampling step alone (direct vs full lattice + cut) and the
    whole stage-01 call (statistics, resampling, normalisation) both ways."""
    out = {"resample_direct": [], "resample_two_step": [], "case_direct": [], "case_two_step": []}
    for path in paths:
        image = sitk.ReadImage(str(path))
        centre, lo, _ = pp.image_statistics(image, cfg)
        full, start, grid = pp.crop_window(image, cfg, centre)

        def two_step_resample():
            resampled = pp._resample(image, full, sitk.sitkLinear, lo)  # keep it alive: the view below borrows its memory
            arr = sitk.GetArrayViewFromImage(resampled)
            return arr[:, max(0, start[1]) : start[1] + grid.size[1], max(0, start[0]) : start[0] + grid.size[0]].copy()

        out["resample_direct"].append(best_of(lambda: pp._resample(image, grid, sitk.sitkLinear, lo), repeats))
        out["resample_two_step"].append(best_of(two_step_resample, repeats))
        out["case_direct"].append(best_of(lambda: pp.preprocess_image(image, None, cfg), repeats))
        out["case_two_step"].append(best_of(lambda: pp.resample_then_crop(image, None, cfg), repeats))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases-per-centre", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU(s); SimpleITK threads {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        synth.generate_cohort(tmp / "roi", seed=0, cases_per_centre=args.cases_per_centre, progress=False)
        gen = time.perf_counter() - t0
        n_cases = 2 * args.cases_per_centre
        print(f"cohort generation (roi, {n_cases} cases): {gen:.1f} s ({gen / n_cases:.2f} s/case, all CPUs)")

        files = sorted((tmp / "roi").rglob("*.nii.gz"))
        t0 = time.perf_counter()
        report = cio.validate_dataset(tmp / "roi")
        val = time.perf_counter() - t0
        assert report.ok
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"validation (roi): {val:.2f} s for {len(files)} files, {1000 * val / len(files):.0f} ms/file ({size_mb:.1f} MB gzip)")

        # Head field of view: one ceT1 and one hrT2 per centre at the real matrix sizes.
        head = tmp / "head"
        head_paths = []
        t0 = time.perf_counter()
        for centre in ("ldn", "etz"):
            for split in ("training_source", "training_target"):
                image, _, facts = synth.generate_case(0, centre, split, 0, 3, fov="head")
                path = head / f"{facts['case']}.nii.gz"
                cio.write_image(image, path)
                head_paths.append(path)
        head_gen = time.perf_counter() - t0
        sizes = ", ".join("x".join(map(str, sitk.ReadImage(str(p)).GetSize())) for p in head_paths)
        print(f"head-fov generation: {head_gen / len(head_paths):.1f} s/case (one process) [{sizes}]")
        t0 = time.perf_counter()
        for path in head_paths:
            cio.check_image_file(path)
        print(f"validation (head): {1000 * (time.perf_counter() - t0) / len(head_paths):.0f} ms/file")

        roi_paths = [p for p in files if p.parent.name in ("training_source", "training_target", "validation") and "_Label" not in p.name]
        print(f"\nstage 01 per case (image only, mean over cases of best-of-{args.repeats}; lattice = the whole volume at 0.6 mm):")
        print(f"{'fov':<6}{'crop':>9}{'voxels lattice/crop':>21}{'resample: direct':>18}{'lattice+cut':>13}{'ratio':>7}{'  | case: direct':>16}{'two-step':>10}{'ratio':>7}")
        for name, paths, crop in (("roi", roi_paths, (176, 144)), ("head", head_paths, (256, 256))):
            cfg = pp.PreprocessConfig(crop_size=crop)
            t = bench_preprocess(paths, cfg, args.repeats)
            voxels = np.mean([np.prod(pp.resampled_lattice(sitk.ReadImage(str(p)), cfg.spacing).size[:2]) / np.prod(crop) for p in paths])
            print(
                f"{name:<6}{'x'.join(map(str, crop)):>9}{voxels:>21.2f}{t['resample_direct']:>17.3f}s{t['resample_two_step']:>12.3f}s"
                f"{t['resample_two_step'] / t['resample_direct']:>6.2f}x{t['case_direct']:>15.3f}s{t['case_two_step']:>9.3f}s{t['case_two_step'] / t['case_direct']:>6.2f}x"
            )


if __name__ == "__main__":
    main()
