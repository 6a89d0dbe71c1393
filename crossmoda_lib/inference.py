"""Stage 08 (and the pseudo-labels of stage 07): segment original hrT2 volumes, write crossMoDA labels.

The models work on the stage-01 crop of a volume; a submission needs a label on the *original* hrT2
grid. For one original hrT2 this module:

1. recomputes the stage-01 crop exactly as :mod:`crossmoda_lib.preprocess` does (crop centre and
   intensity range from the original volume), then re-expresses that same physical crop at each
   model's own spacing (:func:`model_grid`; the paper's last models run at 0.4 x 0.4 x 1.0 mm on the
   crop they were trained on, a 0.6 mm crop of 256 voxels becoming 384);
2. resamples the original (linear) onto that grid and normalises it with the stage-01 range; for a
   model that was trained on clipped real hrT2 (the paper's cochlea models) it applies the same
   percentile clipping; optionally sharpens it with Van Cittert (the paper's last cochlea inference,
   PSF 0.4 x 0.4 x 1.5 mm, 15 iterations);
3. predicts the foreground probability of each structure (sliding window, ensemble, optional
   mirroring) and resamples the *probability* linearly onto the output grid (the original hrT2 grid
   for a submission) before thresholding at 0.5, which is smoother than resampling a label with
   nearest neighbour; outside the crop the probability is 0;
4. keeps the largest connected VS component on the output grid, writes cochlea (2) over VS (1).

A model folder for :func:`load_bundle` / ``crossmoda predict --models DIR`` holds ``inference.json``
(stage-01 settings, inference options, the VS and cochlea model folders, relative to it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from crossmoda_lib import deconvolution as dc
from crossmoda_lib import devices
from crossmoda_lib import io as cio
from crossmoda_lib import preprocess as pp
from crossmoda_lib import segmentation as seg

BUNDLE_FILE = "inference.json"


@dataclass(frozen=True)
class Sharpening:
    """Van Cittert sharpening of a model's input (paper, last cochlea inference: 0.4x0.4x1.5 mm, 15)."""

    psf_mm: tuple[float, float, float] = (0.4, 0.4, 1.5)
    iterations: int = 15
    psf_is: str = "fwhm"
    beta: float = 1.0


@dataclass
class Ensemble:
    """A structure's trained folds, their settings and the percentile its real hrT2 inputs are clipped at."""

    structure: str
    nets: list[torch.nn.Module]
    cfg: seg.SegConfig
    clip_percentile: float | None = None
    sharpen: Sharpening | None = None
    source: str = ""

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.cfg.spacing[::-1])


def load_structure(model_dir: Path | str, structure: str, sharpen: Sharpening | None = None, device: str | torch.device = "cpu") -> Ensemble:
    """Load a structure's ensemble (every fold) from its model folder (``manifest.json`` + ``fold_k/``)
    onto ``device`` (:func:`crossmoda_lib.devices.resolve`), where it then predicts."""
    nets, cfg, manifest = seg.load_ensemble(model_dir, device)
    if manifest.get("structure") not in (None, structure):
        raise cio.DataError(f"{model_dir}: holds a {manifest['structure']} model, not {structure}")
    return Ensemble(structure, nets, cfg, manifest.get("clip_percentile"), sharpen, str(model_dir))


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def model_grid(original: sitk.Image, pre: pp.PreprocessConfig, spacing_xyz: tuple[float, float, float] | None = None) -> tuple[pp.Lattice, float, float]:
    """The stage-01 crop of ``original`` at ``spacing_xyz`` (default: the stage-01 spacing) and the
    stage-01 intensity range ``(lo, hi)``.

    At the stage-01 spacing this is exactly stage 01's grid; at another spacing it covers the same
    physical box (same centre and direction, ``round(n * s / s')`` voxels per axis).
    """
    centre, lo, hi = pp.image_statistics(original, pre)
    _, _, crop = pp.crop_window(original, pre, centre)
    if spacing_xyz is None or np.allclose(spacing_xyz, crop.spacing, atol=1e-6):
        return crop, lo, hi
    return pp.resampled_lattice(crop, tuple(float(s) for s in spacing_xyz)), lo, hi


def resample_image(image: sitk.Image, grid: pp.Lattice, *, label: bool = False, default: float = 0.0) -> sitk.Image:
    """``image`` on ``grid``: linear for images (float32), nearest neighbour for labels (type kept)."""
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out_type = image.GetPixelID() if label else sitk.sitkFloat32
    return sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator, float(default), out_type)


def model_input(original: sitk.Image, grid: pp.Lattice, lo: float, hi: float, ensemble: Ensemble | None = None) -> sitk.Image:
    """The normalised volume a model sees: resampled, stage-01 normalised, sharpened and clipped as
    the ensemble asks (sharpening first, so that clipping sees the sharpened intensities)."""
    image = pp.normalise(resample_image(original, grid, default=lo), lo, hi)
    if ensemble is None:
        return image
    if ensemble.sharpen is not None:
        s = ensemble.sharpen
        image = dc.deconvolve_image(image, s.psf_mm, s.iterations, psf_is=s.psf_is, beta=s.beta)
    if ensemble.clip_percentile is not None:
        clipped = sitk.GetImageFromArray(seg.clip_to_percentile(sitk.GetArrayFromImage(image), ensemble.clip_percentile))
        clipped.CopyInformation(image)
        image = clipped
    return image


def probability(original: sitk.Image, ensemble: Ensemble, pre: pp.PreprocessConfig) -> sitk.Image:
    """The ensemble's foreground probability on its own grid (the crop at the model's spacing)."""
    grid, lo, hi = model_grid(original, pre, ensemble.spacing_xyz)
    image = model_input(original, grid, lo, hi, ensemble)
    prob = sitk.GetImageFromArray(seg.predict_probabilities(ensemble.nets, sitk.GetArrayFromImage(image), ensemble.cfg).astype(np.float32))
    prob.CopyInformation(image)
    return prob


def probability_on(prob: sitk.Image, grid: pp.Lattice | sitk.Image) -> np.ndarray:
    """A probability map resampled linearly onto another grid, as a (z, y, x) array; 0 outside."""
    lattice = grid if isinstance(grid, pp.Lattice) else pp.lattice_of(grid)
    return sitk.GetArrayFromImage(resample_image(prob, lattice, default=0.0))


compose_label = seg.compose_label


def label_image(array: np.ndarray, grid: pp.Lattice | sitk.Image) -> sitk.Image:
    """A uint8 label image with the geometry of ``grid``."""
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    if isinstance(grid, sitk.Image):
        out.CopyInformation(grid)
    else:
        out.SetSpacing(grid.spacing)
        out.SetOrigin(grid.origin)
        out.SetDirection(grid.direction)
    return out


def segment(
    original: sitk.Image,
    vs: Ensemble,
    cochlea: Ensemble,
    pre: pp.PreprocessConfig,
    grids: list[pp.Lattice | sitk.Image] | None = None,
    *,
    keep_largest_vs: bool = True,
    cochlea_components: int = 0,
    report: dict | None = None,
) -> list[sitk.Image]:
    """Label images of one original hrT2 on each of ``grids`` (default: the original grid only);
    post-processing as :func:`compose_label`. ``report``, when given, receives
    :func:`cochlea_report` of the first grid: what the cochlea post-processing removed."""
    grids = grids or [original]
    p_vs, p_co = probability(original, vs, pre), probability(original, cochlea, pre)
    labels = []
    for i, g in enumerate(grids):
        p_cochlea = probability_on(p_co, g)
        label = compose_label(probability_on(p_vs, g), p_cochlea, keep_largest_vs, cochlea_components)
        labels.append(label_image(label, g))
        if report is not None and i == 0:
            report.update(cochlea_report(p_cochlea > 0.5, label == 2, float(np.prod(labels[0].GetSpacing()))))
    return labels


def cochlea_report(before: np.ndarray, after: np.ndarray, voxel_mm3: float) -> dict:
    """Connected components (6-connectivity, as the post-processing counts them) of the thresholded
    cochlea probability ``before`` and of the written cochlea ``after``, and the mm3 removed between
    them."""
    from scipy import ndimage

    found, kept = ndimage.label(before)[1], ndimage.label(after)[1]
    removed = int(np.count_nonzero(before & ~after))
    return {"cochlea_components_found": int(found), "cochlea_components_kept": int(kept), "cochlea_mm3_removed": round(removed * voxel_mm3, 2)}


# --------------------------------------------------------------------------------------------------
# Model bundles and folders
# --------------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """What ``crossmoda predict`` needs: stage-01 settings, the two ensembles, options."""

    preprocess: pp.PreprocessConfig
    vs: Ensemble
    cochlea: Ensemble
    keep_largest_vs: bool = True
    info: dict = field(default_factory=dict)
    cochlea_components: int = 0


def write_bundle(
    out_dir: Path | str,
    preprocess: pp.PreprocessConfig,
    vs_dir: Path | str,
    cochlea_dir: Path | str,
    *,
    cochlea_sharpen: Sharpening | None,
    keep_largest_vs: bool = True,
    cochlea_components: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write ``inference.json`` into ``out_dir``; model folders are stored relative to it."""
    import os

    seg.check_component_count(cochlea_components)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "preprocess": asdict(preprocess),
        "vs": os.path.relpath(Path(vs_dir).resolve(), out_dir.resolve()),
        "cochlea": os.path.relpath(Path(cochlea_dir).resolve(), out_dir.resolve()),
        "cochlea_sharpen": None if cochlea_sharpen is None else asdict(cochlea_sharpen),
        "keep_largest_vs": keep_largest_vs,
        "cochlea_components": cochlea_components,
        **(extra or {}),
    }
    return cio.write_text_atomic(out_dir / BUNDLE_FILE, json.dumps(payload, indent=2) + "\n")


def read_bundle_file(models_dir: Path | str) -> dict:
    """Parse and check ``inference.json`` (no model is loaded); errors name the file and the problem."""
    path = Path(models_dir) / BUNDLE_FILE
    if not path.is_file():
        raise cio.DataError(f"{path}: not found; --models must be a folder written by notebook 08 (or inference.write_bundle)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise cio.DataError(f"{path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("preprocess", "vs", "cochlea") if k not in payload]
    if missing:
        raise cio.DataError(f"{path}: lacks {missing}")
    try:
        seg.check_component_count(payload.get("cochlea_components", 0))
    except ValueError as exc:
        raise cio.DataError(f"{path}: {exc}") from exc
    for key in ("vs", "cochlea"):
        folder = (path.parent / payload[key]).resolve()
        if not (folder / "manifest.json").is_file():
            raise cio.DataError(f"{path}: {key} model folder {folder} has no manifest.json")
    return payload


def load_bundle(models_dir: Path | str, payload: dict | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Load the ensembles a bundle names (``payload``: its already checked ``inference.json``) onto ``device``."""
    models_dir = Path(models_dir)
    payload = payload or read_bundle_file(models_dir)
    preprocess = pp.PreprocessConfig.from_dict(payload["preprocess"])
    sharp = payload.get("cochlea_sharpen")
    sharpen = None if sharp is None else Sharpening(tuple(sharp["psf_mm"]), int(sharp["iterations"]), sharp.get("psf_is", "fwhm"), float(sharp.get("beta", 1.0)))
    vs = load_structure(models_dir / payload["vs"], "vs", device=device)
    cochlea = load_structure(models_dir / payload["cochlea"], "cochlea", sharpen, device)
    return Bundle(preprocess, vs, cochlea, bool(payload.get("keep_largest_vs", True)), payload, payload.get("cochlea_components", 0))


#: In a prediction folder: which input (name and sha256) each label was made from.
PREDICTIONS_RECORD = "predictions.json"


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def label_name(image_name: str) -> str:
    """``crossmoda2022_etz_105_hrT2.nii.gz`` -> ``crossmoda2022_etz_105_Label.nii.gz``."""
    stem = image_name[: -len(".nii.gz")] if image_name.endswith(".nii.gz") else Path(image_name).stem
    return (stem[: -len("_hrT2")] if stem.endswith("_hrT2") else stem) + "_Label.nii.gz"


def check_inputs(in_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Every ``*.nii.gz`` of ``in_dir``, each read and checked; raises :class:`DataError` naming the
    first bad file (or an unusable folder) before any model is loaded."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise cio.DataError(f"{in_dir}: input folder not found")
    if out_dir.exists() and not out_dir.is_dir():
        raise cio.DataError(f"{out_dir}: is a file; the output must be a folder")
    if out_dir.resolve() == in_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise cio.DataError(f"{out_dir}: the output folder must not be the input folder or inside it")
    paths = sorted(p for p in in_dir.glob("*.nii.gz") if not p.name.startswith("."))  # dot files: hidden, or a writer's partial file
    if not paths:
        raise cio.DataError(f"{in_dir}: no .nii.gz files to segment")
    by_label: dict[str, list[str]] = {}
    for path in paths:
        by_label.setdefault(label_name(path.name), []).append(path.name)
    clashes = {label: names for label, names in by_label.items() if len(names) > 1}
    if clashes:
        raise cio.DataError(f"{in_dir}: " + "; ".join(f"{' and '.join(names)} would both be segmented into {label}" for label, names in clashes.items()) + "; rename one of them")
    problems = []
    for path in paths:
        _, found = cio.check_image_file(path)
        problems += [p for p in found if p.fatal]
    if problems:
        raise cio.DataError("; ".join(str(p) for p in problems))
    return paths


def _checkpoint_stamps(models_dir: Path | str, payload: dict) -> dict[str, list[int]]:
    """Size and modification time of every fold checkpoint a bundle uses (cheap staleness check)."""
    stamps = {}
    for key in ("vs", "cochlea"):
        for ckpt in sorted((Path(models_dir) / payload[key]).glob("fold_*/checkpoint.pt")):
            st = ckpt.stat()
            stamps[str(ckpt.resolve())] = [st.st_size, st.st_mtime_ns]
    return stamps


def predict_folder(in_dir: Path | str, out_dir: Path | str, models_dir: Path | str, *, overwrite: bool = False, progress: bool = True, device: str | torch.device = "cpu") -> list[dict]:
    """Segment every hrT2 of ``in_dir`` into ``out_dir/<case>_Label.nii.gz`` on its own grid.

    Inputs and the model bundle are checked before any model is loaded; a prediction that already
    exists is kept (so an interrupted run resumes) only when ``predictions.json`` records it as made
    from this very input (its name and sha256) by these models (``models_used.json``); otherwise,
    or with ``overwrite``, it is recomputed. Two inputs whose labels would share a name are refused.
    A second process on the same ``out_dir`` is refused (:class:`crossmoda_lib.io.FolderLocked`). Writes are atomic. ``device``: where the
    networks run (:func:`crossmoda_lib.devices.resolve`; checked before anything is read).

    Returns:
        One row per case: file, output, seconds, status, voxels of VS and cochlea, and
        :func:`cochlea_report` (components found and kept, mm3 removed); a kept prediction has the
        file names and status only.
    """
    import time

    from tqdm.auto import tqdm

    device = devices.resolve(device)
    paths = check_inputs(in_dir, out_dir)
    payload = read_bundle_file(models_dir)
    bundle = load_bundle(models_dir, payload, device)
    out_dir = Path(out_dir)
    rows = []
    with cio.folder_lock(out_dir, f"crossmoda predict {in_dir}"):
        # Predictions made by other models (retrained, another bundle) are stale: recompute them all.
        stamp = json.dumps({"bundle": payload, "checkpoints": _checkpoint_stamps(models_dir, payload)}, sort_keys=True)
        stamp_path = out_dir / "models_used.json"
        record_path = out_dir / PREDICTIONS_RECORD
        if stamp_path.exists() and stamp_path.read_text() != stamp:
            overwrite = True
        made = {} if overwrite or not record_path.exists() else json.loads(record_path.read_text())
        cio.write_text_atomic(stamp_path, stamp)
        for path in tqdm(paths, desc="08 inference", disable=not progress):
            target = out_dir / label_name(path.name)
            source = {"image": path.name, "sha256": file_sha256(path)}
            # Kept only when it is the label of this very input (same name, same bytes) by these models.
            if target.exists() and made.get(target.name) == source:
                rows.append({"image": path.name, "label": target.name, "seconds": 0.0, "status": "kept"})
                continue
            t0 = time.perf_counter()
            original = sitk.ReadImage(str(path))
            report: dict = {}
            (label,) = segment(original, bundle.vs, bundle.cochlea, bundle.preprocess, keep_largest_vs=bundle.keep_largest_vs, cochlea_components=bundle.cochlea_components, report=report)
            cio.write_image(label, target)
            made[target.name] = source
            cio.write_text_atomic(record_path, json.dumps(made, indent=1, sort_keys=True) + "\n")
            arr = sitk.GetArrayViewFromImage(label)
            rows.append(
                {
                    "image": path.name,
                    "label": target.name,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "status": "written",
                    "vs_voxels": int((arr == 1).sum()),
                    "cochlea_voxels": int((arr == 2).sum()),
                    **report,
                }
            )
    return rows
