"""Stage 01: resample to the paper's spacing, crop around the brain centre, normalise intensities.

The paper (papers/000 section 3, after Choi 2021): all scans are resampled to 0.6 x 0.6 x 1.0 mm,
then a 256 x 256 x Z volume is cropped, centred on the x/y mean location of the voxels above the
75th intensity percentile. Labels get the same grid with nearest-neighbour interpolation.

Implementation choices (documented because the paper leaves them open):

* **One lattice.** The resampled grid keeps the image's direction cosines; along each axis it has
  ``N = round(n * s / s')`` points centred on the original extent. The crop is a window of that
  lattice, so resampling *directly onto the crop grid* (:func:`preprocess_image`) samples exactly
  the points that "resample everything, then crop" (:func:`resample_then_crop`) keeps, at a fraction
  of the cost. Where the window leaves the lattice (small images) it is padded.
* **Crop centre** is computed on the original image, in physical space: the mean physical position
  of the voxels above the percentile. Voxels of one image all have the same volume, so this equals the
  mean over the resampled image up to interpolation error, without resampling the whole volume first.
  The window's centre is the lattice point nearest to it (within half an output voxel).
* **Intensity normalisation**: ``clip((x - lo) / (hi - lo), 0, 1)`` with ``lo, hi`` the 0.5th and
  99.9th percentiles of the original volume (parameters). Padding takes the value ``lo``, i.e. 0
  after normalisation. Why 99.9 and not the usual 99.5: on ceT1 the enhancing voxels (tumour,
  vessels, fat) are a percent or so of the scan, so the 99.5th percentile falls among them or just
  above the brain, by how large the tumour is. Measured on the synthetic London source cases: with
  99.5 the brain's median lands at 0.83, 0.55 and 0.84 (the 0.55 case has a 1% tumour) and every
  tumour is clipped to 1 with the vessels; with 99.9 at 0.52, 0.52 and 0.57, tumours at 0.84-0.95.
  The CycleGAN sees one ceT1 contrast instead of a case-dependent one
  (``tests/test_preprocess.py::test_ceT1_normalisation_does_not_depend_on_the_tumour``). ``lo`` and
  ``hi`` are stored per case in ``cases.csv``, so the mapping can be inverted
  (``x = lo + y (hi - lo)`` for unclipped voxels).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from crossmoda_lib import __version__
from crossmoda_lib import io as cio

#: Output sub-folder of each input split.
STAGE_SPLITS = {"training_source": "source", "training_target": "target", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class PreprocessConfig:
    """Stage 01 settings (paper values by default).

    Attributes:
        spacing: output voxel spacing (x, y, z) in mm.
        crop_size: in-plane crop (x, y) in voxels; z keeps the whole resampled extent.
        centre_percentile: voxels above this percentile define the crop centre.
        intensity_percentiles: (lo, hi) percentiles mapped to 0 and 1.
    """

    spacing: tuple[float, float, float] = (0.6, 0.6, 1.0)
    crop_size: tuple[int, int] = (256, 256)
    centre_percentile: float = 75.0
    intensity_percentiles: tuple[float, float] = (0.5, 99.9)

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), not {self.spacing}")
        if len(self.crop_size) != 2 or any(int(c) < 1 for c in self.crop_size):
            raise ValueError(f"crop_size must be two positive integers, not {self.crop_size}")
        lo, hi = self.intensity_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"intensity_percentiles must satisfy 0 <= lo < hi <= 100, not {self.intensity_percentiles}")
        if not 0 <= self.centre_percentile < 100:
            raise ValueError(f"centre_percentile must be in [0, 100), not {self.centre_percentile}")

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """From the settings recorded in a manifest (lists back to tuples)."""
        return cls(tuple(d["spacing"]), tuple(d["crop_size"]), float(d["centre_percentile"]), tuple(d["intensity_percentiles"]))


@dataclass(frozen=True)
class Lattice:
    """A grid: size (x, y, z), spacing, origin, direction (ITK conventions)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.direction).reshape(3, 3) * np.array(self.spacing)[None, :]

    def point(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.origin) + self.matrix @ np.asarray(index, dtype=float)

    def continuous_index(self, point: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.matrix, np.asarray(point, dtype=float) - np.asarray(self.origin))

    def window(self, start: np.ndarray, size: tuple[int, int, int]) -> Lattice:
        return Lattice(tuple(int(v) for v in size), self.spacing, tuple(float(v) for v in self.point(start)), self.direction)

    def reference(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        ref = sitk.Image([int(v) for v in self.size], pixel_type)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref


def lattice_of(image: sitk.Image) -> Lattice:
    return Lattice(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def resampled_lattice(image: sitk.Image | Lattice, spacing: tuple[float, float, float]) -> Lattice:
    """The full grid of ``image`` (or of a lattice) resampled to ``spacing``: same direction, centred
    on the same extent, ``round(n * s / s')`` points per axis. Applied to a crop lattice it gives the
    same crop at another spacing (stage 08's refinement grid)."""
    src = image if isinstance(image, Lattice) else lattice_of(image)
    n = np.array(src.size, dtype=float)
    ratio = np.array(spacing, dtype=float) / np.array(src.spacing, dtype=float)
    count = np.maximum(1, np.round(n / ratio)).astype(int)
    first = (n - 1) / 2 - (count - 1) / 2 * ratio  # continuous index of the first new point
    return Lattice(tuple(int(c) for c in count), tuple(float(s) for s in spacing), tuple(float(v) for v in src.point(first)), src.direction)


def crop_centre(image: sitk.Image, percentile: float = 75.0) -> np.ndarray:
    """Mean physical position (mm) of the voxels strictly above the given intensity percentile.

    Falls back to the voxels at or above it when none is strictly above (images with a large flat
    top), so the rule never divides by zero.
    """
    arr = sitk.GetArrayViewFromImage(image)
    return _centroid_above(image, arr, float(np.percentile(arr, percentile)))


def _centroid_above(image: sitk.Image, arr: np.ndarray, threshold: float) -> np.ndarray:
    mask = arr > threshold
    if not mask.any():
        mask = arr >= threshold
    # Mean index from the mask's projections (no list of voxel coordinates is built).
    n = mask.sum(dtype=np.int64)
    mean_index = [float((mask.sum(axis=axes, dtype=np.int64) * np.arange(mask.shape[a])).sum()) / n for a, axes in ((2, (0, 1)), (1, (0, 2)), (0, (1, 2)))]
    return lattice_of(image).point(np.array(mean_index))


def crop_window(image: sitk.Image, cfg: PreprocessConfig, centre: np.ndarray | None = None) -> tuple[Lattice, np.ndarray, Lattice]:
    """The crop grid of an image under ``cfg``.

    Returns:
        ``(full lattice, window start index in it, crop lattice)``; z keeps the full lattice.
    """
    full = resampled_lattice(image, cfg.spacing)
    if centre is None:
        centre = crop_centre(image, cfg.centre_percentile)
    k = full.continuous_index(centre)
    size = (int(cfg.crop_size[0]), int(cfg.crop_size[1]), full.size[2])
    start = np.array([int(np.round(k[0] - (size[0] - 1) / 2)), int(np.round(k[1] - (size[1] - 1) / 2)), 0])
    return full, start, full.window(start, size)


def _resample(image: sitk.Image, grid: Lattice, interpolator: int, default: float) -> sitk.Image:
    out_type = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else image.GetPixelID()
    return sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator, float(default), out_type)


def _checked_range(arr: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise cio.DataError("constant image: intensity normalisation is undefined")
    return lo, hi


def image_statistics(image: sitk.Image, cfg: PreprocessConfig) -> tuple[np.ndarray, float, float]:
    """Crop centre (mm) and intensity range from one percentile pass over the volume."""
    arr = sitk.GetArrayViewFromImage(image)
    p_lo, p_hi = cfg.intensity_percentiles
    threshold, lo, hi = (float(v) for v in np.percentile(arr, [cfg.centre_percentile, p_lo, p_hi]))
    return _centroid_above(image, arr, threshold), *_checked_range(arr, lo, hi)


def normalise(image: sitk.Image, lo: float, hi: float) -> sitk.Image:
    """``clip((x - lo) / (hi - lo), 0, 1)`` as float32, geometry kept."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip((arr - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0))
    out.CopyInformation(image)
    return out


def preprocess_image(image: sitk.Image, label: sitk.Image | None, cfg: PreprocessConfig) -> tuple[sitk.Image, sitk.Image | None, dict]:
    """Resample straight onto the crop grid (linear image, nearest-neighbour label) and normalise.

    Args:
        image: the original volume.
        label: its label (same grid) or None.
        cfg: settings.

    Returns:
        ``(image, label, info)``; info holds the crop centre, window and intensity range.
    """
    centre, lo, hi = image_statistics(image, cfg)
    full, start, grid = crop_window(image, cfg, centre)
    out = normalise(_resample(image, grid, sitk.sitkLinear, lo), lo, hi)
    out_label = _resample(label, grid, sitk.sitkNearestNeighbor, 0) if label is not None else None
    inside = [(max(0, start[a]), min(full.size[a], start[a] + grid.size[a])) for a in range(3)]
    covered = np.prod([max(0, b - a) for a, b in inside]) / np.prod(grid.size)
    info = {
        "crop_centre_x_mm": float(centre[0]),
        "crop_centre_y_mm": float(centre[1]),
        "crop_start_i": int(start[0]),
        "crop_start_j": int(start[1]),
        "resampled_size": "x".join(str(v) for v in full.size),
        "padded_fraction": round(float(1.0 - covered), 6),
        "intensity_lo": lo,
        "intensity_hi": hi,
    }
    return out, out_label, info


def resample_then_crop(image: sitk.Image, label: sitk.Image | None, cfg: PreprocessConfig) -> tuple[sitk.Image, sitk.Image | None]:
    """The two-step reference: resample the whole volume, then cut (and pad) the same window.

    Gives the same voxels as :func:`preprocess_image`; kept for tests and the benchmark.
    """
    centre, lo, hi = image_statistics(image, cfg)
    full, start, grid = crop_window(image, cfg, centre)

    def cut(img: sitk.Image, default: float) -> sitk.Image:
        arr = sitk.GetArrayFromImage(img)
        out = np.full(grid.size[::-1], default, dtype=arr.dtype)
        src = [slice(max(0, start[a]), min(full.size[a], start[a] + grid.size[a])) for a in range(3)]
        dst = [slice(s.start - start[a], s.stop - start[a]) for a, s in enumerate(src)]
        out[dst[2], dst[1], dst[0]] = arr[src[2], src[1], src[0]]
        res = sitk.GetImageFromArray(out)
        res.SetSpacing(grid.spacing)
        res.SetOrigin(grid.origin)
        res.SetDirection(grid.direction)
        return res

    out = normalise(cut(_resample(image, full, sitk.sitkLinear, lo), lo), lo, hi)
    out_label = cut(_resample(label, full, sitk.sitkNearestNeighbor, 0), 0) if label is not None else None
    return out, out_label


def preprocess_dataset(data_dir: Path | str, out_dir: Path | str, cfg: PreprocessConfig, *, progress: bool = True, overwrite: bool = False) -> pd.DataFrame:
    """Validate a crossMoDA folder, then preprocess every volume of every split.

    Writes ``out_dir/{source,target,validation}/`` (and ``test/`` when the data has that split) (images, and labels for source), and, when the
    data has ``synthetic_truth/``, ``out_dir/synthetic_truth/`` on the hrT2 crops; then ``cases.csv``
    and ``manifest.json`` (settings, library version). A finished stage with the same settings is
    skipped (its table is returned) when its input files are those it was made from (name, size and
    modification time of every file, :func:`crossmoda_lib.io.folder_stamps`); otherwise it is redone.

    Args:
        data_dir: input folder (crossMoDA 2022 layout); never written to.
        out_dir: the stage folder, e.g. ``outputs/demo/01_preprocess``.
        cfg: settings.
        progress: show a progress bar.
        overwrite: redo a finished stage.

    Raises:
        DataError: the input is invalid (every problem listed, nothing written).
    """
    from tqdm.auto import tqdm

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_not_inside(out_dir, data_dir)
    manifest_path = out_dir / "manifest.json"
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    inputs = cio.folder_stamps(data_dir)
    if manifest_path.exists() and not overwrite:
        previous = json.loads(manifest_path.read_text())
        # Reused only for the same settings and the same input files (a file replaced under its name counts).
        if previous.get("settings") == settings and previous.get("data_dir") == str(data_dir.resolve()) and previous.get("inputs") == inputs:
            return pd.read_csv(out_dir / "cases.csv")
    report = cio.validate_dataset(data_dir)
    report.raise_if_errors()
    jobs = []
    for split, sub in STAGE_SPLITS.items():
        for case, path in cio.iter_split(data_dir, split):
            jobs.append((split, sub, case, path))
    rows = []
    for split, sub, case, path in tqdm(jobs, desc="01 preprocess", disable=not progress):
        image = sitk.ReadImage(str(path))
        modality = cio.SPLITS[split]
        label_path = path.parent / f"{case}_Label.nii.gz" if split == "training_source" else cio.truth_label_path(data_dir, case)
        label = sitk.ReadImage(str(label_path)) if label_path.exists() else None
        out, out_label, info = preprocess_image(image, label, cfg)
        cio.write_image(out, out_dir / sub / f"{case}_{modality}.nii.gz")
        if out_label is not None:
            dest = out_dir / sub / f"{case}_Label.nii.gz" if split == "training_source" else cio.truth_label_path(out_dir, case)
            cio.write_image(out_label, dest)
        rows.append(
            {
                "case": case,
                "split": split,
                "centre": cio.centre_of(case),
                "modality": modality,
                "original_spacing": "x".join(f"{s:.4f}" for s in image.GetSpacing()),
                "original_size": "x".join(str(s) for s in image.GetSize()),
                "output_size": "x".join(str(s) for s in out.GetSize()),
                **info,
                "file": f"{sub}/{case}_{modality}.nii.gz",
            }
        )
    table = pd.DataFrame(rows)
    cio.write_text_atomic(out_dir / "cases.csv", table.to_csv(index=False))
    manifest = {"stage": "01_preprocess", "library_version": __version__, "data_dir": str(data_dir.resolve()), "settings": settings, "inputs": inputs, "n_cases": len(rows)}
    cio.write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return table


def check_not_inside(out_dir: Path, data_dir: Path) -> None:
    """Refuse to write outputs into the input folder (or inputs inside the output folder)."""
    out_r, data_r = out_dir.resolve(), data_dir.resolve()
    if out_r == data_r or data_r in out_r.parents:
        raise cio.DataError(f"{out_dir}: output folder is inside the input folder {data_dir}; choose another output_dir")
    if out_r in data_r.parents:
        raise cio.DataError(f"{data_dir}: input folder is inside the stage output folder {out_dir}")


def label_volumes_mm3(label: sitk.Image) -> dict[int, float]:
    """Volume (mm3) of each non-zero label value, from the voxel spacing."""
    counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel().astype(np.int64), minlength=3)
    voxel = float(np.prod(label.GetSpacing()))
    return {value: float(counts[value]) * voxel for value in (1, 2)}


def label_volume_table(data_dir: Path | str, stage: Path | str) -> pd.DataFrame:
    """VS and cochlea volumes (mm3) of every label before and after preprocessing, side by side."""
    data_dir, stage = Path(data_dir), Path(stage)
    pairs = [(p, stage / "source" / p.name) for p in sorted((data_dir / "training_source").glob("*_Label.nii.gz"))]
    pairs += [(p, stage / "synthetic_truth" / p.name) for p in sorted((data_dir / "synthetic_truth").glob("*_Label.nii.gz"))]
    rows = []
    for original, processed in pairs:
        if not processed.exists():
            continue
        before = label_volumes_mm3(sitk.ReadImage(str(original)))
        after = label_volumes_mm3(sitk.ReadImage(str(processed)))
        case = original.name.split("_Label")[0].removesuffix("_hrT2")
        row = {"case": case, "centre": cio.centre_of(case)}
        for value, name in ((1, "vs"), (2, "cochlea")):
            row[f"{name}_mm3_original"] = round(before[value], 1)
            row[f"{name}_mm3_preprocessed"] = round(after[value], 1)
            row[f"{name}_change_pct"] = round(100 * (after[value] - before[value]) / before[value], 1) if before[value] else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def tissue_levels(image: np.ndarray, label: np.ndarray, anatomy_threshold: float = 0.05) -> dict[str, float]:
    """Where a normalised volume puts its tissues: the median of the anatomy (voxels above
    ``anatomy_threshold``, mostly brain), the mean inside the VS (label 1), and the fraction of VS
    voxels clipped at 1. The brain's level should not depend on the tumour's size."""
    vs = label == 1
    return {
        "brain_median": float(np.median(image[image > anatomy_threshold])),
        "vs_mean": float(image[vs].mean()) if vs.any() else float("nan"),
        "vs_clipped_fraction": float((image[vs] >= 1.0).mean()) if vs.any() else float("nan"),
    }


def tissue_level_table(stage: Path | str) -> pd.DataFrame:
    """:func:`tissue_levels` of every preprocessed source ceT1 (with its label), one row per case."""
    rows = []
    for path in sorted((Path(stage) / "source").glob("*_ceT1.nii.gz")):
        label = Path(str(path).replace("_ceT1.nii.gz", "_Label.nii.gz"))
        if label.exists():
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            case = path.name.removesuffix("_ceT1.nii.gz")
            levels = tissue_levels(image, sitk.GetArrayFromImage(sitk.ReadImage(str(label))))
            rows.append({"case": case, "centre": cio.centre_of(case), **{k: round(v, 3) for k, v in levels.items()}})
    return pd.DataFrame(rows)
