"""Stage 05: tumour blending augmentation (TBA), the paper's contribution (papers/000 sections 2-3).

Each region of interest (VS or cochlea) of a pseudo-hrT2 volume is brightened or darkened by a factor
lambda ("naive" scaling), then every axial slice holding it is passed through the SinGAN pyramid of
stage 04 from a start scale n0 upwards (the original SinGAN harmonization), and blended back::

    out = (1 - m) * ref + m * singan(ref)

with ``ref`` the naively scaled slice and ``m`` the ROI mask dilated by a disk (7 px), Gaussian-blurred
(sigma 5 px) and min-max normalised, all in the SinGAN's pixel grid. Voxels where ``m = 0`` are
copied, bit for bit, from the input. Labels are unchanged.

Which volumes are augmented follows the paper's rules (every number a parameter, :data:`PAPER_RULES`):
Tilburg VS larger than 2340 mm3 whose intensity standard deviation exceeds 0.09 get lambda 0.7, 1.2
and 1.5; VS smaller than 288 mm3 get 0.6, 0.8 and 1.2; each at start scales 13 and 15; every cochlea
gets 2, 3 and 4 at scale 13. Volumes are in mm3 from the voxel spacing (the paper's 6500 and 800
voxels assume 0.36 mm3 voxels). The standard deviation is that of the pseudo-hrT2 intensities in the
VS, on [0, 1] (LaTIM mapped the CycleGAN output from [-1, 1] to [0, 1]).

Replayable: an augmentation's parameters (lambda, start scale, seed) are drawn or enumerated first and
recorded; :func:`blend_volume` is deterministic given them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from scipy import ndimage

from crossmoda_lib import io as cio
from crossmoda_lib import singan as sg

STRUCTURES = {"vs": 1, "cochlea": 2}


@dataclass(frozen=True)
class BlendRule:
    """Which ROIs get which augmentations. Thresholds are strict (volume > min, < max; std > min)."""

    name: str
    structure: str
    lambdas: tuple[float, ...]
    start_scales: tuple[int, ...]
    centres: tuple[str, ...] = ("London", "Tilburg")
    min_volume_mm3: float | None = None
    max_volume_mm3: float | None = None
    min_std: float | None = None

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"rule {self.name}: structure must be one of {sorted(STRUCTURES)}, not {self.structure!r}")
        if not self.lambdas or not self.start_scales:
            raise ValueError(f"rule {self.name}: needs at least one lambda and one start scale")

    def matches(self, centre: str, volume_mm3: float, std: float) -> bool:
        if centre not in self.centres or volume_mm3 <= 0:
            return False
        if self.min_volume_mm3 is not None and not volume_mm3 > self.min_volume_mm3:
            return False
        if self.max_volume_mm3 is not None and not volume_mm3 < self.max_volume_mm3:
            return False
        return self.min_std is None or std > self.min_std

    @classmethod
    def from_dict(cls, d: dict) -> BlendRule:
        d = dict(d)
        for key in ("lambdas", "start_scales", "centres"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


PAPER_RULES = (
    BlendRule("vs_large_heterogeneous", "vs", (0.7, 1.2, 1.5), (13, 15), ("Tilburg",), min_volume_mm3=2340.0, min_std=0.09),
    BlendRule("vs_small", "vs", (0.6, 0.8, 1.2), (13, 15), max_volume_mm3=288.0),
    BlendRule("cochlea", "cochlea", (2.0, 3.0, 4.0), (13,)),
)


@dataclass(frozen=True)
class BlendParams:
    """Everything that determines one augmentation."""

    structure: str
    lam: float
    start_scale: int
    seed: int
    dilation_px: int = 7
    blur_sigma_px: float = 5.0


def roi_statistics(image: sitk.Image, label: sitk.Image) -> dict[str, float]:
    """VS and cochlea volume (mm3, from the spacing) and intensity standard deviation in each."""
    arr = sitk.GetArrayViewFromImage(image)
    lab = sitk.GetArrayViewFromImage(label)
    voxel = float(np.prod(label.GetSpacing()))
    out = {}
    for name, value in STRUCTURES.items():
        inside = lab == value
        out[f"{name}_volume_mm3"] = float(inside.sum()) * voxel
        out[f"{name}_std"] = float(arr[inside].std()) if inside.any() else 0.0
    return out


def select(cases: pd.DataFrame, rules: tuple[BlendRule, ...] | list[BlendRule]) -> pd.DataFrame:
    """One row per (case, rule) that matches: ``cases`` needs case, centre, and per structure
    ``<s>_volume_mm3`` and ``<s>_std``."""
    rows = []
    for case in cases.itertuples(index=False):
        for rule in rules:
            s = rule.structure
            if rule.matches(case.centre, getattr(case, f"{s}_volume_mm3"), getattr(case, f"{s}_std")):
                rows.append({"case": case.case, "centre": case.centre, "rule": rule.name, "structure": s, "volume_mm3": getattr(case, f"{s}_volume_mm3"), "std": getattr(case, f"{s}_std")})
    return pd.DataFrame(rows, columns=["case", "centre", "rule", "structure", "volume_mm3", "std"])


def plan(selected: pd.DataFrame, rules: tuple[BlendRule, ...] | list[BlendRule], seed: int, dilation_px: int = 7, blur_sigma_px: float = 5.0) -> list[tuple[dict, BlendParams]]:
    """Enumerate every (lambda, start scale) of each selected (case, rule), with a seed per
    augmentation drawn from one generator seeded by ``seed`` (so the plan is replayable)."""
    by_name = {r.name: r for r in rules}
    rng = np.random.default_rng(seed)
    out = []
    for row in selected.to_dict("records"):
        rule = by_name[row["rule"]]
        for lam in rule.lambdas:
            for n0 in rule.start_scales:
                out.append((row, BlendParams(rule.structure, float(lam), int(n0), int(rng.integers(0, 2**31 - 1)), dilation_px, blur_sigma_px)))
    return out


@dataclass
class RandomTumourBlending:
    """A random TBA: draws lambda (uniform in ``lambda_range``), a start scale and a seed, then calls
    the deterministic :func:`blend_volume`; ``last`` records what was drawn."""

    model: sg.SinGANModel
    structure: str
    lambda_range: tuple[float, float]
    start_scales: tuple[int, ...]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    last: BlendParams | None = None

    def draw(self) -> BlendParams:
        lam = float(self.rng.uniform(*self.lambda_range))
        n0 = int(self.rng.choice(self.start_scales))
        return BlendParams(self.structure, lam, n0, int(self.rng.integers(0, 2**31 - 1)))

    def __call__(self, image: sitk.Image, label: sitk.Image) -> sitk.Image:
        self.last = self.draw()
        return blend_volume(image, label, self.last, self.model)


def blend_mask(mask: np.ndarray, dilation_px: int, blur_sigma_px: float) -> np.ndarray:
    """The blending weight: binary dilation by a disk, Gaussian blur, min-max normalisation."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    r = int(dilation_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = xx**2 + yy**2 <= r**2
    m = ndimage.binary_dilation(mask, structure=disk).astype(np.float64)
    m = ndimage.gaussian_filter(m, blur_sigma_px, mode="constant", truncate=4.0)
    lo, hi = m.min(), m.max()
    m = (m - lo) / (hi - lo) if hi > lo else np.ones_like(m)
    m[m < 1e-7] = 0.0  # below float32 resolution of the image: exactly untouched
    return m.astype(np.float32)


def harmonize_slice(model: sg.SinGANModel, image: np.ndarray, mask: np.ndarray, params: BlendParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend one axial slice.

    Args:
        model: the SinGAN pyramid.
        image: (H, W) slice in [0, 1].
        mask: (H, W) boolean ROI.
        params: lambda, start scale, seed, mask sizes.

    Returns:
        ``(blended slice, naive slice, blending weight)``, each (H, W) float32 on the slice grid.
    """
    image = image.astype(np.float32)
    ref = image.copy()
    ref[mask] = np.clip(image[mask] * np.float32(params.lam), 0.0, 1.0)
    finest = model.pyramid.sizes[-1]
    shape = image.shape
    ref_t = torch.from_numpy(ref)[None, None] * 2 - 1
    mask_s = sg.resize(torch.from_numpy(mask.astype(np.float32))[None, None], finest)[0, 0].numpy() > 0.5 if tuple(finest) != shape else mask
    m = blend_mask(mask_s, params.dilation_px, params.blur_sigma_px)
    out = sg.harmonize(model, sg.resize(ref_t, finest), params.start_scale, params.seed)
    out01 = ((out + 1) / 2).clamp(0, 1).cpu()
    if tuple(finest) != shape:
        out01 = sg.resize(out01, shape)
        m = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    out_np = out01[0, 0].numpy().astype(np.float32)
    blended = ref.copy()
    touched = m > 0
    blended[touched] = (1 - m[touched]) * ref[touched] + m[touched] * out_np[touched]
    return blended, ref, m


def slice_seed(seed: int, z: int) -> int:
    """The seed of slice z of an augmentation (documented so that any slice can be replayed)."""
    return (int(seed) * 1_000_003 + int(z)) % (2**31 - 1)


def blend_volume(image: sitk.Image, label: sitk.Image, params: BlendParams, model: sg.SinGANModel) -> sitk.Image:
    """Tumour blending of one structure in every axial slice holding it; geometry kept.

    Deterministic given ``params``; voxels outside the blending weight are bit-identical to the input.
    """
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayViewFromImage(label) == STRUCTURES[params.structure]
    out = arr.copy()
    for z in np.nonzero(lab.any(axis=(1, 2)))[0]:
        slice_params = BlendParams(params.structure, params.lam, params.start_scale, slice_seed(params.seed, z), params.dilation_px, params.blur_sigma_px)
        out[z], _, _ = harmonize_slice(model, arr[z], lab[z], slice_params)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def naive_volume(image: sitk.Image, label: sitk.Image, structure: str, lam: float) -> np.ndarray:
    """The naively scaled volume (ROI x lambda, clipped to [0, 1]) as an array, for figures."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    roi = sitk.GetArrayViewFromImage(label) == STRUCTURES[structure]
    arr[roi] = np.clip(arr[roi] * np.float32(lam), 0, 1)
    return arr


def case_table(folder: Path | str, pattern: str = "*_pseudoT2.nii.gz") -> pd.DataFrame:
    """Per case of a pseudo-hrT2 folder: centre, VS/cochlea volumes (mm3) and intensity stds."""
    rows = []
    for path in sorted(Path(folder).glob(pattern)):
        case = path.name.removesuffix("_pseudoT2.nii.gz")
        label = path.parent / f"{case}_Label.nii.gz"
        rows.append({"case": case, "centre": cio.centre_of(case), **roi_statistics(sitk.ReadImage(str(path)), sitk.ReadImage(str(label)))})
    return pd.DataFrame(rows)


def blend_stage(
    stage03: Path | str,
    model: sg.SinGANModel,
    out_dir: Path | str,
    rules: tuple[BlendRule, ...] | list[BlendRule],
    seed: int,
    *,
    sources: dict[str, str] | None = None,
    dilation_px: int = 7,
    blur_sigma_px: float = 5.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Stage 05: select, augment and write volumes; returns (and writes) ``augmentations.csv``.

    Args:
        stage03: the stage-03 folder (``pseudo_hrT2/`` and ``pseudo_hrT2_vc/``).
        model: the SinGAN pyramid of stage 04.
        out_dir: the stage folder; volumes go to ``augmented/``.
        rules: selection rules.
        seed: seed of the augmentation plan.
        sources: stage-03 sub-folder per structure (default: VS from the Van Cittert-sharpened
            volumes, cochlea from the plain pseudo-hrT2, as the paper sharpens for VS).
        dilation_px: disk radius of the blending mask.
        blur_sigma_px: Gaussian sigma of the blending mask.
        progress: progress bar.
    """
    from tqdm.auto import tqdm

    stage03, out_dir = Path(stage03), Path(out_dir)
    sources = sources or {"vs": "pseudo_hrT2_vc", "cochlea": "pseudo_hrT2"}
    n_top = model.pyramid.n_scales - 1
    bad = sorted({n for r in rules for n in r.start_scales if not 1 <= n <= n_top})
    if bad:
        raise ValueError(f"start scales {bad} outside 1..{n_top}: this SinGAN has {n_top + 1} scales")
    tables = {s: case_table(stage03 / folder) for s, folder in sources.items()}
    for s, table in tables.items():
        if table.empty:
            raise cio.DataError(f"{stage03 / sources[s]}: no pseudo-hrT2 volumes; run notebooks/03_translate.ipynb")
    selected = pd.concat([select(tables[s], [r for r in rules if r.structure == s]) for s in sources], ignore_index=True)
    jobs = plan(selected, rules, seed, dilation_px, blur_sigma_px)
    rows = []
    for row, params in tqdm(jobs, desc="05 tumour blending", disable=not progress):
        folder = stage03 / sources[params.structure]
        image = sitk.ReadImage(str(folder / f"{row['case']}_pseudoT2.nii.gz"))
        label_path = folder / f"{row['case']}_Label.nii.gz"
        label = sitk.ReadImage(str(label_path))
        name = f"{row['case']}_{params.structure}_l{params.lam:g}_n{params.start_scale}"
        out_path = out_dir / "augmented" / f"{name}_pseudoT2.nii.gz"
        cio.write_image(blend_volume(image, label, params, model), out_path)
        cio.write_bytes_atomic(out_dir / "augmented" / f"{name}_Label.nii.gz", label_path.read_bytes())
        rows.append(
            {
                "case": row["case"],
                "centre": row["centre"],
                "rule": row["rule"],
                "structure": params.structure,
                "lambda": params.lam,
                "start_scale": params.start_scale,
                "seed": params.seed,
                "volume_mm3": round(row["volume_mm3"], 2),
                "std": round(row["std"], 5),
                "source": sources[params.structure],
                "file": f"augmented/{out_path.name}",
            }
        )
    table = pd.DataFrame(rows, columns=["case", "centre", "rule", "structure", "lambda", "start_scale", "seed", "volume_mm3", "std", "source", "file"])
    cio.write_text_atomic(out_dir / "augmentations.csv", table.to_csv(index=False))
    # Volumes of an earlier run with other rules would otherwise stay beside this run's.
    keep = {Path(f).name for f in table.file} | {Path(f).name.replace("_pseudoT2", "_Label") for f in table.file}
    for stale in (out_dir / "augmented").glob("*.nii.gz"):
        if stale.name not in keep:
            stale.unlink()
    stats = pd.concat([t.assign(source=sources[s]) for s, t in tables.items()], ignore_index=True)
    cio.write_text_atomic(out_dir / "roi_statistics.csv", stats.to_csv(index=False))
    from crossmoda_lib import __version__

    manifest = {
        "stage": "05_tumor_blending",
        "library_version": __version__,
        "seed": seed,
        "rules": [asdict(r) for r in rules],
        "sources": sources,
        "dilation_px": dilation_px,
        "blur_sigma_px": blur_sigma_px,
        "n_augmented": len(rows),
    }
    cio.write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return table


def figure3_rows(stage05: Path | str, stage03: Path | str, table: pd.DataFrame, margin_mm: float = 15.0) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The paper's Figure 3 from saved files: for the VS and the cochlea, the augmentation with the
    largest lambda: original pseudo-hrT2 | naive lambda scaling | harmonized, cropped around the ROI at
    its largest slice."""
    stage05, stage03 = Path(stage05), Path(stage03)
    rows = []
    for structure in ("vs", "cochlea"):
        sub = table[table.structure == structure]
        if sub.empty:
            continue
        row = sub.sort_values(["lambda", "start_scale", "case"], ascending=[False, True, True]).iloc[0]
        folder = stage03 / row["source"]
        image = sitk.ReadImage(str(folder / f"{row['case']}_pseudoT2.nii.gz"))
        label = sitk.ReadImage(str(folder / f"{row['case']}_Label.nii.gz"))
        lab = sitk.GetArrayFromImage(label) == STRUCTURES[structure]
        z = int(lab.sum(axis=(1, 2)).argmax())
        ys, xs = np.nonzero(lab[z])
        pad = int(round(margin_mm / image.GetSpacing()[0]))
        y0, y1 = max(0, ys.min() - pad), ys.max() + pad + 1
        x0, x1 = max(0, xs.min() - pad), xs.max() + pad + 1
        original = sitk.GetArrayFromImage(image)[z]
        naive = naive_volume(image, label, structure, float(row["lambda"]))[z]
        blended = sitk.GetArrayFromImage(sitk.ReadImage(str(stage05 / row["file"])))[z]
        title = f"{structure.upper() if structure == 'vs' else 'cochlea'}\n{row['case']}"
        rows.append(
            (title, [("original pseudo-hrT2", original[y0:y1, x0:x1]), (f"naive x {row['lambda']:g}", naive[y0:y1, x0:x1]), (f"harmonized (start scale {row['start_scale']})", blended[y0:y1, x0:x1])])
        )
    return rows


def structure_levels(image: np.ndarray, mask: np.ndarray, scale: float | None = None) -> dict[str, float]:
    """Where a structure sits in its volume, in units of the volume's 99th percentile (on hrT2 about
    the CSF), or of ``scale`` when given (1.0: image units): ``level``, the mean inside ``mask``;
    ``contrast``, that mean minus the mean over the shell 2-3 voxels outside it (6-neighbour
    dilations). NaN for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return {"level": float("nan"), "contrast": float("nan")}
    scale = max(float(np.percentile(image, 99)), 1e-6) if scale is None else scale
    shell = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
    inside = float(image[mask].mean())
    return {"level": inside / scale, "contrast": (inside - float(image[shell].mean())) / scale}


def level_table(stage05: Path | str, stage03: Path | str, table: pd.DataFrame) -> pd.DataFrame:
    """:func:`structure_levels` of every augmented volume of ``table`` (``augmentations.csv``) and of
    the pseudo-hrT2 it came from, one row per augmentation: does lambda bring the structure where
    hrT2 puts it, and does the harmonization keep it there?"""
    stage05, stage03 = Path(stage05), Path(stage03)
    rows, cache = [], {}
    for row in table.to_dict("records"):
        key = (row["source"], row["case"], row["structure"])
        if key not in cache:
            folder = stage03 / row["source"]
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{row['case']}_Label.nii.gz"))) == STRUCTURES[row["structure"]]
            cache[key] = (label, structure_levels(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{row['case']}_pseudoT2.nii.gz"))), label))
        label, before = cache[key]
        after = structure_levels(sitk.GetArrayFromImage(sitk.ReadImage(str(stage05 / row["file"]))), label)
        rows.append(
            {
                "case": row["case"],
                "structure": row["structure"],
                "lambda": row["lambda"],
                "start_scale": row["start_scale"],
                "level_before": before["level"],
                "level_after": after["level"],
                "contrast_before": before["contrast"],
                "contrast_after": after["contrast"],
            }
        )
    return pd.DataFrame(rows, columns=["case", "structure", "lambda", "start_scale", "level_before", "level_after", "contrast_before", "contrast_after"])


def reference_levels(stage01: Path | str, split: str = "target") -> pd.DataFrame:
    """:func:`structure_levels` of the VS and cochlea on the real hrT2 of ``split`` (stage 01) where a
    ground truth exists: only a synthetic cohort has one (``synthetic_truth/``). Empty otherwise.
    For reading the augmentation, never for choosing its settings from the target domain's labels."""
    stage01 = Path(stage01)
    rows = []
    for path in sorted((stage01 / split).glob("*_hrT2.nii.gz")):
        truth = cio.truth_label_path(stage01, path.name)
        if not truth.exists():
            continue
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(truth)))
        case = path.name.removesuffix("_hrT2.nii.gz")
        for structure, value in STRUCTURES.items():
            if (label == value).any():
                rows.append({"case": case, "structure": structure, **structure_levels(image, label == value)})
    return pd.DataFrame(rows, columns=["case", "structure", "level", "contrast"])
