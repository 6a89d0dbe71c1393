"""Stage 09: Dice, ASSD and HD95 as the crossMoDA 2022 scoring computed them (medpy 0.4.0 semantics).

Definitions (DESIGN.md section 5; medpy 0.4.0 ``dc``, ``asd``, ``assd``, ``hd95``):

* **surface** of a binary mask: the mask minus its erosion by the 6-neighbour cross
  (``generate_binary_structure(3, 1)``, medpy's default connectivity 1); the erosion treats voxels
  outside the array as background, so mask voxels on the array border are surface;
* **directed average surface distance** ``asd(A, B)``: the mean, over surface voxels of A, of the
  Euclidean distance (mm, from the voxel spacing) to the nearest surface voxel of B;
* **ASSD** = ``(asd(A, B) + asd(B, A)) / 2``: the mean of the two directed means (medpy 0.4.0; newer
  medpy pools both distance sets instead, which weights the larger surface more);
* **HD95**: the 95th percentile of both directed distance sets pooled (medpy ``hd95``);
* **Dice** = ``2 |A and B| / (|A| + |B|)``.

Rules of the challenge: an empty prediction scores Dice 0 and ASSD 350 mm (we also give it HD95
350 mm); an empty ground truth makes the case unscorable for that structure: it is reported with
status ``empty truth`` and NaN values, never averaged in silently.

Speed: distances only need the union's bounding box. Every mask voxel on that box's faces has a
background neighbour outside it, so surfaces are unchanged by the crop, and every surface voxel of
either mask lies inside it, so the distance transform (exact Euclidean distance to the nearest
surface voxel) is unchanged too. The official scoring read the spacing from the affine's diagonal;
we use the image spacing (the same for axis-aligned images, correct for the London volumes whose
direction cosines are flipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from crossmoda_lib import io as cio

EMPTY_PREDICTION_ASSD = 350.0
STRUCTURES = {"VS": 1, "Cochlea": 2}
OFFICIAL_COLUMNS = ["Case", "VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD"]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """``2 |A and B| / (|A| + |B|)``; 0 when both are empty (medpy's convention)."""
    a, b = pred.astype(bool), truth.astype(bool)
    denom = int(a.sum()) + int(b.sum())
    return 0.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its erosion by the 6-neighbour cross (array-border voxels count as surface)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), iterations=1)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(a | b)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi))
    return a[box], b[box]


def surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, ...], *, crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every surface voxel of ``a`` to ``b``'s surface, and from ``b``'s to ``a``'s.

    Both masks must be non-empty. ``crop=False`` computes on the whole arrays (same values, slower).
    """
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    if crop:
        a, b = _crop_to_union(a, b)
    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing_zyx)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing_zyx)
    return to_b[sa], to_a[sb]


def _assd_of(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    return float((d_pt.mean() + d_tp.mean()) / 2.0)


def _hd95_of(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    return float(np.percentile(np.hstack((d_pt, d_tp)), 95))


def assd(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, ...], *, crop: bool = True) -> float:
    """medpy 0.4.0 ``assd``: the mean of the two directed average surface distances (mm)."""
    return _assd_of(*surface_distances(pred, truth, spacing_zyx, crop=crop))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, ...], *, crop: bool = True) -> float:
    """medpy ``hd95``: 95th percentile of both directed surface distance sets pooled (mm)."""
    return _hd95_of(*surface_distances(pred, truth, spacing_zyx, crop=crop))


@dataclass(frozen=True)
class StructureScore:
    dice: float
    assd: float
    hd95: float
    status: str  # "ok", "empty prediction", "empty truth"


def score_structure(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, ...]) -> StructureScore:
    """One structure's scores under the challenge rules (see the module docstring)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not truth.any():
        return StructureScore(float("nan"), float("nan"), float("nan"), "empty truth")
    if not pred.any():
        return StructureScore(0.0, EMPTY_PREDICTION_ASSD, EMPTY_PREDICTION_ASSD, "empty prediction")
    distances = surface_distances(pred, truth, spacing_zyx)  # once for both ASSD and HD95
    return StructureScore(dice(pred, truth), _assd_of(*distances), _hd95_of(*distances), "ok")


def score_case(pred: sitk.Image, truth: sitk.Image, case: str = "") -> dict:
    """A row of ``scores.csv`` for one case (label images on the same grid)."""
    problem = cio.geometry_mismatch(pred, truth)
    if problem:
        raise cio.DataError(f"{case or 'prediction'}: prediction and ground truth grids differ ({problem})")
    p, t = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth)
    spacing = tuple(float(s) for s in truth.GetSpacing()[::-1])
    row: dict = {"Case": case, "Centre": cio.centre_of(case) if case else ""}
    for name, value in STRUCTURES.items():
        s = score_structure(p == value, t == value, spacing)
        row.update({f"{name}_Dice": s.dice, f"{name}_ASSD": s.assd, f"{name}_HD95": s.hd95, f"{name}_status": s.status})
    voxel_mm3 = float(np.prod(truth.GetSpacing()))
    for name, value in STRUCTURES.items():
        row[f"{name}_truth_mm3"] = float((t == value).sum()) * voxel_mm3
    return row


def case_of(file_name: str) -> str:
    """The case name of a label file: ``<case>_Label.nii.gz`` or ``<case>_hrT2_Label.nii.gz``."""
    for suffix in ("_hrT2_Label.nii.gz", "_Label.nii.gz", ".nii.gz"):
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def evaluate_folders(pred_dir: Path | str, truth_dir: Path | str, cases: list[str] | None = None) -> pd.DataFrame:
    """Score every ground truth of ``truth_dir`` (or only those of ``cases``) against its prediction in ``pred_dir``.

    Both folders are validated first (label values, readable files, matching grids); a missing
    prediction is an error naming the case. Predictions without a ground truth are ignored.

    Returns:
        One row per case: the official columns ``Case, VS_Dice, VS_ASSD, Cochlea_Dice, Cochlea_ASSD``,
        then ``Centre``, the HD95 columns and a status per structure.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for folder, what in ((pred_dir, "prediction"), (truth_dir, "ground truth")):
        if not folder.is_dir():
            raise cio.DataError(f"{folder}: {what} folder not found")
    truths = {case_of(p.name): p for p in sorted(truth_dir.glob("*.nii.gz"))}
    preds = {case_of(p.name): p for p in sorted(pred_dir.glob("*.nii.gz"))}
    if cases is not None:
        absent = sorted(set(cases) - set(truths))
        if absent:
            raise cio.DataError(f"{truth_dir}: no ground truth for {', '.join(absent)}")
        truths = {c: truths[c] for c in sorted(cases)}
    if not truths:
        raise cio.DataError(f"{truth_dir}: no ground-truth labels (*.nii.gz)")
    nameless = [truths[c].name for c in truths if not any(f"_{code}_" in c for code in cio.CENTRES)]
    if nameless:  # scores are reported per centre, read from the name
        raise cio.DataError(f"{truth_dir}: {len(nameless)} label(s) without a centre in the name (_ldn_ or _etz_, as crossmoda2022_ldn_211_Label.nii.gz), e.g. {nameless[0]}")
    missing = sorted(set(truths) - set(preds))
    if missing:
        raise cio.DataError(f"{pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing)}")
    images, problems = {}, []
    for _case, path in [*truths.items(), *((c, preds[c]) for c in truths)]:
        image, found = cio.check_image_file(path, is_label=True)
        problems += [p for p in found if p.fatal]
        images[path] = image
    if problems:
        raise cio.DataError("; ".join(str(p) for p in problems))
    rows = [score_case(images[preds[c]], images[truths[c]], c) for c in truths]
    table = pd.DataFrame(rows)
    rest = [c for c in table.columns if c not in OFFICIAL_COLUMNS]
    return table[OFFICIAL_COLUMNS + rest]


def has_truth(truth_dir: Path | str, cases: list[str]) -> bool:
    """Whether ``truth_dir`` holds a ground truth for every one of ``cases`` (the synthetic cohort's
    ``synthetic_truth/``, or a user's own labels). The crossMoDA validation and test labels are
    not public: on the real data there is none, and stage 09 reports predicted volumes only."""
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir() or not cases:
        return False
    found = {case_of(p.name) for p in truth_dir.glob("*.nii.gz")}
    return set(cases) <= found


def prediction_volumes(pred_dir: Path | str, cases: list[str]) -> pd.DataFrame:
    """What can be said of predictions without ground truth: per case, the predicted VS and cochlea
    volumes in mm3 and their connected components (a VS in two pieces, or more than two cochleae,
    is worth a look).

    Raises:
        DataError: a case has no prediction, or a prediction is not a valid label file.
    """
    from scipy import ndimage

    pred_dir = Path(pred_dir)
    rows, problems = [], []
    for case in cases:
        path = pred_dir / f"{case}_Label.nii.gz"
        if not path.is_file():
            problems.append(f"{path}: no prediction for {case}")
            continue
        image, found = cio.check_image_file(path, is_label=True)
        problems += [str(p) for p in found if p.fatal]
        if image is None:
            continue
        arr = sitk.GetArrayViewFromImage(image)
        voxel_mm3 = float(np.prod(image.GetSpacing()))
        row: dict = {"Case": case, "Centre": cio.centre_of(case)}
        for name, value in STRUCTURES.items():
            mask = arr == value
            row[f"{name}_predicted_mm3"] = float(mask.sum()) * voxel_mm3
            row[f"{name}_components"] = int(ndimage.label(mask)[1])
        rows.append(row)
    if problems:
        raise cio.DataError("; ".join(problems))
    return pd.DataFrame(rows)


def summary_table(scores: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean, std, median and IQR of each metric (per group of ``by``), counting scorable cases only."""
    metrics = [c for c in scores.columns if c.split("_")[-1] in ("Dice", "ASSD", "HD95")]
    long = scores.melt(id_vars=[c for c in scores.columns if c not in metrics], value_vars=metrics, var_name="metric", value_name="value").dropna(subset=["value"])
    keys = (by or []) + ["metric"]
    g = long.groupby(keys, sort=False)["value"]
    out = pd.DataFrame({"n": g.count(), "mean": g.mean(), "std": g.std(ddof=1), "median": g.median(), "q25": g.quantile(0.25), "q75": g.quantile(0.75)})
    return out.reset_index()


def formatted_table(scores: pd.DataFrame, by: list[str] | None = None, style: str = "mean_std") -> pd.DataFrame:
    """The paper's Table 1 layout: one row per group, ``mean +- std`` (or ``median [q25 - q75]``) per metric."""
    s = summary_table(scores, by)
    fmt = (lambda r: f"{r['mean']:.4f} ± {r['std']:.4f}") if style == "mean_std" else (lambda r: f"{r['median']:.4f} [{r['q25']:.4f} - {r['q75']:.4f}]")
    s["value"] = s.apply(fmt, axis=1)
    index = by or []
    if not index:
        return s.set_index("metric")[["value"]].T.rename(index={"value": style})
    return s.pivot(index=index, columns="metric", values="value")[list(dict.fromkeys(s.metric))]
