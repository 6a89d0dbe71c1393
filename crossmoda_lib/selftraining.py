"""Stage 07: self-training on real hrT2 with pseudo-labels (papers/000 section 3).

``rounds`` rounds of pseudo-labelling and retraining, then the final model: round ``k`` (1 ..
``rounds + 1``) under ``07_self_training/round_<k>/``, the last being the final model (the paper:
three rounds, "we repeat this self training stage iteratively two more times", then "the last
segmentation model was trained for 1000 epochs using real hrT2 with the last best pseudo labels
only": four trainings after stage 06; docs/interpretations.md):

1. the teacher (round ``k-1``'s models; stage 06's for round 1) segments every real hrT2 of
   ``training_target`` (:func:`crossmoda_lib.inference.segment`, VS largest component kept, cochlea
   input clipped as the teacher was trained) into ``pseudo_labels/<case>_Label.nii.gz`` (1 VS,
   2 cochlea) on this round's training grid;
2. new VS and cochlea ensembles train on the stage-06 training set plus the real hrT2 with their
   pseudo-labels; real hrT2 is clipped at its 95th percentile for the cochlea ("to also facilitate
   the first cochlear segmentation stages": not in the final model unless ``cochlea_clip_final``);
3. the last round (the final model) trains on real hrT2 with the last pseudo-labels only, for ``final_epochs`` (1000
   in the paper), and at ``final_spacing`` (0.4 x 0.4 x 1.0 mm in the paper: the same crop, finer).

With ``synthetic_truth`` (the synthetic cohort), ``pseudo_label_dice.csv`` measures every round's
pseudo-labels against the truth resampled (nearest neighbour) onto the same grid. Rounds are
resumable: finished rounds are kept, pseudo-labels already written are reused, training resumes
from its checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from crossmoda_lib import devices
from crossmoda_lib import inference as inf
from crossmoda_lib import io as cio
from crossmoda_lib import preprocess as pp
from crossmoda_lib import segmentation as seg


@dataclass(frozen=True)
class SelfTrainingConfig:
    """Stage 07 settings (paper values by default).

    Attributes:
        rounds: rounds of pseudo-labelling and retraining on the stage-06 set plus real hrT2,
            before the final model (paper 3). 0: the final model learns from stage 06's
            pseudo-labels directly.
        self_training: False skips stage 07 (stage 06's models are final: the
            ``no_self_training`` and ``source_only`` ablations).
        round_epochs: epochs of the intermediate rounds (paper: 500, as stage 06).
        final_epochs: epochs of the last round (paper 1000).
        final_spacing: (x, y, z) mm of the last round's grid, the same crop (paper 0.4 x 0.4 x 1.0).
        final_patch_size: (z, y, x) patch of the last round (None: stage 06's).
        folds: ensemble folds per round (paper 5).
        cochlea_clip_percentile: real hrT2 clipped at this percentile for the cochlea (paper 95).
        cochlea_clip_final: the final cochlea model is clipped too (the paper: the clip is "to
            facilitate the first cochlear segmentation stages", so False).
        cochlea_components: the cochlea pseudo-labels keep their this-many largest components (0:
            all, the paper; 2: one per ear, not in the paper), as ``compose_label``. The VS keeps
            its largest, as the paper does for every VS model.
        warm_start: the structures (``"vs"``, ``"cochlea"``) whose models start each round from
            their teacher's weights (fold k from fold k) instead of a fresh initialisation; the
            schedule restarts. Empty: every model retrains from scratch, as nnU-Net does (the paper
            says nothing else). Needs networks of the same shapes, so not with a
            ``final_spacing`` or ``final_patch_size`` that changes the plan.
    """

    rounds: int = 3
    self_training: bool = True
    round_epochs: int = 500
    final_epochs: int = 1000
    final_spacing: tuple[float, float, float] = (0.4, 0.4, 1.0)
    final_patch_size: tuple[int, int, int] | None = None
    folds: int = 5
    cochlea_clip_percentile: float | None = 95.0
    cochlea_clip_final: bool = False
    cochlea_components: int = 0
    warm_start: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be 0 (the final model straight from stage 06's pseudo-labels) or more, not {self.rounds}; self_training: false skips stage 07")
        seg.check_component_count(self.cochlea_components)
        if isinstance(self.warm_start, (str, bool)) or any(s not in seg.STRUCTURES for s in self.warm_start):
            raise ValueError(f"warm_start must list structures among {sorted(seg.STRUCTURES)} (empty: none), not {self.warm_start!r}")
        object.__setattr__(self, "warm_start", tuple(self.warm_start))


    @property
    def trained_rounds(self) -> int:
        """Models trained in stage 07: the rounds and the final model (0 without self-training)."""
        return self.rounds + 1 if self.self_training else 0


def preprocess_settings(stage01: Path | str) -> pp.PreprocessConfig:
    """The stage-01 settings recorded in its manifest."""
    return pp.PreprocessConfig.from_dict(json.loads((Path(stage01) / "manifest.json").read_text())["settings"])


def round_dir(root: Path | str, k: int) -> Path:
    return Path(root) / f"round_{k}"


def teacher_dirs(stage06: Path | str, root: Path | str, k: int) -> dict[str, Path]:
    """Model folders that make round ``k``'s pseudo-labels."""
    base = Path(stage06) if k == 1 else round_dir(root, k - 1)
    return {s: base / s for s in seg.STRUCTURES}


def pseudo_label_round(
    data_dir: Path | str,
    stage01: Path | str,
    teacher: dict[str, Path],
    out: Path,
    spacing_xyz: tuple[float, float, float],
    *,
    keep_largest_vs: bool = True,
    cochlea_components: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[list[seg.Pair], pd.DataFrame]:
    """Pseudo-label every ``training_target`` hrT2 on the crop at ``spacing_xyz``.

    Returns:
        The real pairs (image on the grid, pseudo-label) and one Dice row per case (NaN without truth).
    """
    from tqdm.auto import tqdm

    stage01 = Path(stage01)
    pre = preprocess_settings(stage01)
    same_grid = np.allclose(spacing_xyz, pre.spacing)
    ensembles = None
    pairs, rows = [], []
    cases = list(cio.iter_split(data_dir, "training_target"))
    if not cases:
        raise cio.DataError(f"{Path(data_dir) / 'training_target'}: no real hrT2 to self-train on")
    for case, path in tqdm(cases, desc=f"07 pseudo-labels {out.name}", disable=not progress):
        label_path = out / "pseudo_labels" / f"{case}_Label.nii.gz"
        image_path = stage01 / "target" / f"{case}_hrT2.nii.gz" if same_grid else out / "hrT2" / f"{case}_hrT2.nii.gz"
        original = sitk.ReadImage(str(path))
        grid, lo, hi = inf.model_grid(original, pre, spacing_xyz)
        if not same_grid and not image_path.exists():
            cio.write_image(inf.model_input(original, grid, lo, hi), image_path)
        if label_path.exists():
            label = sitk.ReadImage(str(label_path))
        else:
            if ensembles is None:
                ensembles = {s: inf.load_structure(d, s, device=device) for s, d in teacher.items()}
            (label,) = inf.segment(original, ensembles["vs"], ensembles["cochlea"], pre, [grid], keep_largest_vs=keep_largest_vs, cochlea_components=cochlea_components)
            cio.write_image(label, label_path)
        pseudo = sitk.GetArrayFromImage(label)
        row = {"case": case, "centre": cio.centre_of(case), "vs_mm3": float((pseudo == 1).sum() * np.prod(grid.spacing)), "cochlea_mm3": float((pseudo == 2).sum() * np.prod(grid.spacing))}
        truth_file = cio.truth_label_path(data_dir, case)
        if truth_file.exists():
            truth = sitk.GetArrayFromImage(inf.resample_image(sitk.ReadImage(str(truth_file)), grid, label=True))
            for name, value in seg.STRUCTURES.items():
                row[f"{name}_dice"] = seg.dice_score(pseudo == value, truth == value)
        rows.append(row)
        pairs.append(seg.Pair(case, image_path, label_path, False, True))
    return pairs, pd.DataFrame(rows)


def clip_percentile(cfg: SelfTrainingConfig, structure: str, final: bool) -> float | None:
    """The percentile at which a round's real hrT2 is clipped for ``structure``: the cochlea's, in
    the rounds, and in the final model only with ``cochlea_clip_final`` (the paper: "to also
    facilitate the first cochlear segmentation stages")."""
    if structure != "cochlea" or (final and not cfg.cochlea_clip_final):
        return None
    return cfg.cochlea_clip_percentile


def student_settings(base: dict, cfg: SelfTrainingConfig, spacing_xyz: tuple[float, float, float], final: bool) -> seg.SegConfig:
    """A round's settings for a structure: stage 06's (``base``, its model manifest), on the round's
    grid, for the round's epochs (and, in the final round, ``final_patch_size`` when given)."""
    settings = replace(seg.SegConfig.from_dict(base["settings"]), spacing=tuple(round(s, 4) for s in spacing_xyz[::-1]), epochs=cfg.final_epochs if final else cfg.round_epochs)
    if final and cfg.final_patch_size is not None:
        settings = replace(settings, patch_size=tuple(cfg.final_patch_size))
    return settings


def run_round(
    k: int, cfg: SelfTrainingConfig, data_dir: Path | str, stage01: Path | str, stage06: Path | str, root: Path | str, *, workers: int = 1, progress: bool = True, device: str = "cpu"
) -> dict:
    """Run (or resume, or reuse) round ``k``; returns its manifest. ``workers``: processes that train
    the round's models side by side (:func:`crossmoda_lib.segmentation.train_structures`); ``device``:
    where the teachers predict and the students train."""
    out = round_dir(root, k)
    manifest_path = out / "manifest.json"
    settings_record = json.loads(json.dumps(asdict(cfg)))  # as stored: tuples become lists
    if manifest_path.exists():
        done = json.loads(manifest_path.read_text())
        defaults = json.loads(json.dumps(asdict(SelfTrainingConfig())))  # settings added since take their default
        if {**defaults, **done["settings"]} != settings_record:
            raise ValueError(f"{out}: this round was made with other self-training settings; delete {out.parent} (or use another output_dir) to redo it")
        return done
    t0 = time.perf_counter()
    final = k == cfg.trained_rounds
    pre = preprocess_settings(stage01)
    spacing = tuple(cfg.final_spacing) if final else pre.spacing
    teacher = teacher_dirs(stage06, root, k)
    bases = {structure: seg.model_manifest(Path(stage06) / structure) for structure in seg.STRUCTURES}
    settings = {structure: student_settings(base, cfg, spacing, final) for structure, base in bases.items()}
    for structure in cfg.warm_start:  # checked before any pseudo-label is made
        seg.check_warm_start(seg.SegConfig.from_dict(seg.model_manifest(teacher[structure])["settings"]), settings[structure], teacher[structure])
    real_pairs, dice = pseudo_label_round(data_dir, stage01, teacher, out, spacing, cochlea_components=cfg.cochlea_components, progress=progress, device=device)
    cio.write_text_atomic(out / "pseudo_label_dice.csv", dice.assign(round=k).to_csv(index=False))
    jobs = []
    for structure, base in bases.items():
        pairs = real_pairs if final else seg.manifest_pairs(base, real=False) + real_pairs
        clip = clip_percentile(cfg, structure, final)
        init = teacher[structure] if structure in cfg.warm_start else None
        jobs.append(seg.StructureJob(pairs, structure, settings[structure], cfg.folds, out / structure, clip, init))
    tables = seg.train_structures(jobs, workers=workers, progress=progress, device=device)
    summaries = [table.assign(training_volumes=len(job.pairs), real_volumes=len(real_pairs)) for job, table in zip(jobs, tables)]
    manifest = {
        "stage": "07_self_training",
        "round": k,
        "final": final,
        "teacher": {s: str(d) for s, d in teacher.items()},
        "settings": settings_record,
        "spacing_xyz": list(spacing),
        "summary": pd.concat(summaries, ignore_index=True).to_dict("records"),
        "pseudo_label_dice": {c: float(dice[c].mean()) for c in dice if c.endswith("_dice")},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    seg.save_manifest(out, manifest)
    return manifest


def self_train(
    cfg: SelfTrainingConfig, data_dir: Path | str, stage01: Path | str, stage06: Path | str, root: Path | str, *, workers: int = 1, progress: bool = True, device: str = "cpu"
) -> pd.DataFrame:
    """All rounds; writes ``dice_by_round.csv`` (every round's pseudo-label Dice) and ``manifest.json``.

    Returns:
        The per-case pseudo-label table of every round.
    """
    root = Path(root)
    device = str(devices.resolve(device))  # checked before any round starts
    manifests = [run_round(k, cfg, data_dir, stage01, stage06, root, workers=workers, progress=progress, device=device) for k in range(1, cfg.trained_rounds + 1)]
    tables = [pd.read_csv(round_dir(root, k) / "pseudo_label_dice.csv") for k in range(1, cfg.trained_rounds + 1)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["case", "centre", "vs_mm3", "cochlea_mm3", "round"])
    cio.write_text_atomic(root / "dice_by_round.csv", table.to_csv(index=False))
    final = round_dir(root, cfg.trained_rounds) if cfg.trained_rounds else Path(stage06)
    seg.save_manifest(
        root,
        {
            "stage": "07_self_training",
            "rounds": cfg.rounds,
            "trained_rounds": cfg.trained_rounds,
            "final_models": {s: os.path.relpath(Path(final).resolve() / s, root.resolve()) for s in seg.STRUCTURES},
            "settings": asdict(cfg),
            "round_wall_s": [m["wall_s"] for m in manifests],
        },
    )
    return table


def final_models(root: Path | str) -> dict[str, Path]:
    """The VS and cochlea model folders of the last round (from ``manifest.json``, where they are
    stored relative to ``root`` so that an output folder can be moved or copied whole; absolute in
    runs made before that)."""
    manifest_path = Path(root) / "manifest.json"
    if not manifest_path.exists():
        raise cio.DataError(f"{root}: self-training has not finished (manifest.json missing); run notebooks/07_self_training.ipynb")
    return {s: Path(p) if Path(p).is_absolute() else (Path(root) / p).resolve() for s, p in json.loads(manifest_path.read_text())["final_models"].items()}


def round_overlays(data_dir: Path | str, stage01: Path | str, root: Path | str, trained_rounds: int, cases: list[str]) -> list[tuple[str, list[tuple[str, np.ndarray, np.ndarray | None]]]]:
    """For each case: ``(case, [(panel, hrT2 slice, label slice)])`` for the truth (when present) and
    every round's pseudo-label, on the stage-01 grid (finer grids are resampled onto it with nearest
    neighbour), at the slice with the largest true VS (else round 1's)."""
    root, stage01 = Path(root), Path(stage01)
    rows = []
    for case in cases:
        ref = sitk.ReadImage(str(stage01 / "target" / f"{case}_hrT2.nii.gz"))
        grid = pp.lattice_of(ref)
        labels = []
        truth_file = cio.truth_label_path(data_dir, case)
        if truth_file.exists():
            labels.append(("truth", sitk.GetArrayFromImage(inf.resample_image(sitk.ReadImage(str(truth_file)), grid, label=True))))
        for k in range(1, trained_rounds + 1):
            lab = sitk.ReadImage(str(round_dir(root, k) / "pseudo_labels" / f"{case}_Label.nii.gz"))
            labels.append((f"round {k} pseudo-label", sitk.GetArrayFromImage(inf.resample_image(lab, grid, label=True))))
        image = sitk.GetArrayFromImage(ref)
        z = int((labels[0][1] == 1).sum(axis=(1, 2)).argmax())
        rows.append((case, [(name, image[z], lab[z]) for name, lab in labels]))
    return rows
