"""Peak memory of a segmentation training as the cohort grows: volumes in memory against volumes read
from disk (crossmoda_lib.volumes.VolumeStore).

For each cohort size (default 20 and 80 volumes) it writes that many volumes of the paper's shape
(the 256 x 256 crop at 0.6 x 0.6 x 1.0 mm, 64 slices; a smooth random texture with a tumour-like
blob, float32 NIfTI), then trains one model for a few iterations in a fresh process, twice: with
every volume loaded into memory first (how stages 06-07 worked before the store), and through the
store. It prints the peak resident memory (ru_maxrss of the process) and the disk the unpacked
volumes take, side by side, with the ratio of 80 to 20 volumes for each path.

    .venv/bin/python benchmarks/bench_memory.py [--volumes 20 80] [--iterations 6] [--root outputs/benchmarks/memory]

The network is the demo's size (8 base filters) on the demo's patch: the figure of interest is how
memory grows with the number of volumes, not the network's own share.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (64, 256, 256)  # (z, y, x): the paper's crop, 64 slices


def write_cohort(folder: Path, n: int) -> None:
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from crossmoda_lib import io as cio

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        image_path, label_path = folder / f"crossmoda2022_etz_{k + 1:03d}_hrT2.nii.gz", folder / f"crossmoda2022_etz_{k + 1:03d}_Label.nii.gz"
        if image_path.exists() and label_path.exists():
            continue
        rng = np.random.default_rng(k)
        image = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 3) * 4 + 0.4
        z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
        centre = rng.integers([20, 80, 80], [44, 176, 176])
        label = (((z - centre[0]) / 5.0) ** 2 + ((y - centre[1]) / 12.0) ** 2 + ((x - centre[2]) / 12.0) ** 2 < 1).astype(np.uint8)
        image[label > 0] += 0.4
        for array, path in ((np.clip(image, 0, 1), image_path), (label, label_path)):
            out = sitk.GetImageFromArray(array)
            out.SetSpacing((0.6, 0.6, 1.0))
            cio.write_image(out, path)


CHILD = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from crossmoda_lib import segmentation as seg
from crossmoda_lib.volumes import VolumeStore
folder, mode, iterations, out = Path({folder!r}), {mode!r}, {iterations}, Path({out!r})
pairs = [seg.Pair(p.name.split("_hrT2")[0], p, p.with_name(p.name.replace("_hrT2", "_Label"))) for p in sorted(folder.glob("*_hrT2.nii.gz"))]
cfg = seg.SegConfig(
    spacing=(1.0, 0.6, 0.6), patch_size=(24, 80, 80), base_filters=8, max_filters=320, batch_size=2,
    epochs=1, iterations_per_epoch=iterations, val_every=0, mirror_tta=False, optimizer="adam", lr=3e-3,
)
t0 = time.perf_counter()
if mode == "memory":
    cases = [seg.load_case(p.image, p.label, 1) for p in pairs]
    disk = 0
else:
    cases = VolumeStore(pairs, 1, None, out / "cache")
    disk = cases.nbytes_on_disk()
seg.train(cases, [], cfg, out / "model", progress=False)
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "unpacked_mb": disk / 2**20, "seconds": time.perf_counter() - t0}}))
"""


def measure(folder: Path, mode: str, iterations: int, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    code = CHILD.format(root=str(ROOT), folder=str(folder), mode=mode, iterations=iterations, out=str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, nargs="+", default=[20, 80])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--root", default="outputs/benchmarks/memory")
    args = ap.parse_args(argv)
    root = (ROOT / args.root).resolve() if not Path(args.root).is_absolute() else Path(args.root)
    rows = []
    for n in args.volumes:
        folder = root / f"cohort_{n}"
        t0 = time.perf_counter()
        write_cohort(folder, n)
        print(f"{n} volumes of {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in ("memory", "disk"):
            r = measure(folder, mode, args.iterations, root / f"run_{n}_{mode}")
            rows.append({"volumes": n, "mode": mode, **r})
            print(f"  {mode:6s}: peak RSS {r['peak_rss_mb']:7.0f} MB, unpacked {r['unpacked_mb']:6.0f} MB on disk, {r['seconds']:.0f} s", flush=True)
    print("\nvolumes  in memory (MB)  from disk (MB)")
    by = {(r["volumes"], r["mode"]): r for r in rows}
    for n in args.volumes:
        print(f"{n:7d}  {by[(n, 'memory')]['peak_rss_mb']:14.0f}  {by[(n, 'disk')]['peak_rss_mb']:14.0f}")
    if len(args.volumes) >= 2:
        lo, hi = min(args.volumes), max(args.volumes)
        for mode in ("memory", "disk"):
            print(f"{mode}: peak RSS with {hi} volumes / with {lo}: {by[(hi, mode)]['peak_rss_mb'] / by[(lo, mode)]['peak_rss_mb']:.2f}")
    (root / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
