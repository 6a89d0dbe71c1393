"""Stage 09 tables and figures, built from saved CSV files only (no model, no image needed except
for the overlay figure), so that re-running notebook 09 rebuilds everything in seconds.

Tables are written as Markdown, CSV and LaTeX side by side (:func:`save_table`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from crossmoda_lib import io as cio
from crossmoda_lib import metrics

#: papers/000 Table 1, validation phase (real crossMoDA 2022 data): mean +- std.
PAPER_VALIDATION = {"VS_Dice": (0.8682, 0.0601), "VS_ASSD": (0.4302, 0.1780), "Cochlea_Dice": (0.8506, 0.0294), "Cochlea_ASSD": (0.1892, 0.1457)}
#: VS size groups of the blending rules (DESIGN.md section 4): small < 288 mm3, large > 2340 mm3.
VS_GROUPS = {"small (<288 mm3)": (0.0, 288.0), "medium": (288.0, 2340.0), "large (>2340 mm3)": (2340.0, np.inf)}


def save_table(table: pd.DataFrame, path_stem: Path | str, caption: str = "") -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.tex`` atomically (in Markdown, each level of a
    row MultiIndex becomes its own column instead of a tuple)."""
    stem = Path(path_stem)
    md = table.reset_index().to_markdown(index=False) if isinstance(table.index, pd.MultiIndex) else table.to_markdown()
    tex = table.to_latex(caption=caption or None, escape=True)
    return [
        cio.write_text_atomic(stem.with_suffix(".md"), (f"{caption}\n\n" if caption else "") + md + "\n"),
        cio.write_text_atomic(stem.with_suffix(".csv"), table.to_csv()),
        cio.write_text_atomic(stem.with_suffix(".tex"), tex),
    ]


def official(scores: pd.DataFrame) -> pd.DataFrame:
    return scores[metrics.OFFICIAL_COLUMNS + ["Centre"]]


def table1(scores: pd.DataFrame, label: str = "this run") -> pd.DataFrame:
    """The paper's Table 1 layout (mean +- std per structure and metric) with the paper's row."""
    ours = metrics.formatted_table(official(scores).drop(columns="Centre")).rename(index={"mean_std": label})
    paper = pd.DataFrame({k: [f"{m:.4f} ± {s:.4f}"] for k, (m, s) in PAPER_VALIDATION.items()}, index=["paper, crossMoDA 2022 validation (other data)"])
    return pd.concat([ours, paper[ours.columns]])


def centre_tables(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-centre ``mean +- std`` and ``median [IQR]`` tables."""
    return metrics.formatted_table(official(scores), ["Centre"]), metrics.formatted_table(official(scores), ["Centre"], style="median_iqr")


def with_groups(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` with a ``VS_group`` column from the true VS volume (small / medium / large)."""
    out = scores.copy()
    vol = out["VS_truth_mm3"]
    out["VS_group"] = "medium"
    for name, (lo, hi) in VS_GROUPS.items():
        out.loc[(vol >= lo) & (vol < hi), "VS_group"] = name
    return out


def score_plot(scores: pd.DataFrame, split: str = "validation") -> plt.Figure:
    """Box and strip plots of Dice and ASSD per centre and structure (``split`` names the cases)."""
    import seaborn as sns

    long = official(scores).melt(id_vars=["Case", "Centre"], var_name="metric", value_name="value")
    long["structure"] = long.metric.str.split("_").str[0]
    long["measure"] = long.metric.str.split("_").str[1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, measure in zip(axes, ("Dice", "ASSD")):
        part = long[long.measure == measure].dropna(subset=["value"])
        sns.boxplot(data=part, x="structure", y="value", hue="Centre", ax=ax, showfliers=False, palette="pastel")
        sns.stripplot(data=part, x="structure", y="value", hue="Centre", ax=ax, dodge=True, palette="dark", size=4, legend=False)
        ax.set_ylabel(f"{measure}{' (mm)' if measure == 'ASSD' else ''}")
        ax.set_xlabel("")
        if measure == "Dice":
            ax.set_ylim(0, 1)
    fig.suptitle(f"{split} scores per centre and structure", fontsize=10)
    fig.tight_layout()
    return fig


def volume_plot(volumes: pd.DataFrame, split: str = "validation") -> plt.Figure:
    """Strip plots of the predicted VS and cochlea volumes (mm3) per centre: the figure a run without
    ground truth can draw (:func:`crossmoda_lib.metrics.prediction_volumes`)."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, structure in zip(axes, ("VS", "Cochlea")):
        sns.stripplot(data=volumes, x="Centre", y=f"{structure}_predicted_mm3", hue="Centre", ax=ax, palette="dark", size=5, legend=False)
        ax.set_ylabel(f"predicted {structure} (mm3)")
        ax.set_xlabel("")
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{split}: predicted volumes per centre (no ground truth, no scores)", fontsize=10)
    fig.tight_layout()
    return fig


def ablation_table(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean Dice and ASSD of each run, per centre and overall (rows: run; columns: centre x metric)."""
    rows = []
    for name, scores in runs.items():
        for centre, part in [("all", scores), *scores.groupby("Centre")]:
            row = {"run": name, "centre": centre, "n": len(part)}
            for metric in metrics.OFFICIAL_COLUMNS[1:]:
                row[metric] = part[metric].mean()
            rows.append(row)
    table = pd.DataFrame(rows).set_index(["run", "centre"])
    return table.round(4)


def group_table(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean VS Dice per VS size group and run (where TBA is meant to help: small and large tumours)."""
    parts = []
    for name, scores in runs.items():
        g = with_groups(scores).groupby("VS_group").agg(n=("VS_Dice", "size"), VS_Dice=("VS_Dice", "mean"))
        parts.append(g.assign(run=name).reset_index())
    return pd.concat(parts).pivot(index="VS_group", columns="run", values="VS_Dice").round(4)


def rounds_table(dice_by_round: pd.DataFrame) -> pd.DataFrame:
    """Mean pseudo-label Dice (training_target, against synthetic truth) per structure, centre and round."""
    cols = [c for c in dice_by_round.columns if c.endswith("_dice")]
    if not cols or dice_by_round.empty:
        return pd.DataFrame()
    long = dice_by_round.melt(id_vars=["case", "centre", "round"], value_vars=cols, var_name="structure", value_name="Dice")
    long["structure"] = long.structure.str.replace("_dice", "")
    return long.groupby(["structure", "centre", "round"]).Dice.mean().unstack("round").round(4)


# --------------------------------------------------------------------------------------------------
# Seeds (benchmarks/bench_seeds.py): one row per whole demo run
# --------------------------------------------------------------------------------------------------

#: Columns of ``seeds.csv``: one row per (seed, CPU kernels) run of a whole profile. Dice and ASSD
#: are means over the reported split's cases; the cochlea twice, with the run's post-processing and
#: with the paper's (every component); ``translation_score`` is the VS oracle's Dice on the run's
#: pseudo-hrT2 (``bench_translation_quality.py``); ``vs_band_dice`` the draw gate's criterion on
#: it (source labels only); ``draw`` the CycleGAN draw the gate chose (0 without a gate); ``wall_min`` the run's notebooks 01-09.
SEED_COLUMNS = (
    "seed", "cpu_kernels", "split", "cases",
    "VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD", "Cochlea_Dice_every_component", "Cochlea_ASSD_every_component",
    "London_VS_Dice", "Tilburg_VS_Dice", "London_Cochlea_Dice", "Tilburg_Cochlea_Dice",
    "translation_score", "vs_band_dice", "draw", "wall_min", "commit", "code",
)  # fmt: skip
#: A run whose mean VS Dice is below this failed (the translation or the training did not find tumours).
FAILED_VS_DICE = 0.5


def seed_row(scores: pd.DataFrame, every_component: pd.DataFrame, **facts) -> dict:
    """One row of ``seeds.csv`` from a run's scores (its own post-processing) and the scores of the
    same models with every cochlea component kept; ``facts`` gives the other columns."""
    row = {
        "cases": len(scores),
        **{m: float(scores[m].mean()) for m in metrics.OFFICIAL_COLUMNS[1:]},
        "Cochlea_Dice_every_component": float(every_component["Cochlea_Dice"].mean()),
        "Cochlea_ASSD_every_component": float(every_component["Cochlea_ASSD"].mean()),
    }
    for centre, part in scores.groupby("Centre"):
        row[f"{centre}_VS_Dice"] = float(part["VS_Dice"].mean())
        row[f"{centre}_Cochlea_Dice"] = float(part["Cochlea_Dice"].mean())
    row.update(facts)
    return {c: row.get(c, np.nan) for c in SEED_COLUMNS}


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median, worst run and failure rate over the runs of ``seeds.csv`` (never the best run).

    Rows: one per kernel family (``cpu_kernels``); columns: median and worst of VS and cochlea Dice
    (both post-processings) and of the ASSDs (worst: the largest), runs, failed runs (VS Dice below
    :data:`FAILED_VS_DICE`)."""
    rows = []
    for kernels, part in table.groupby("cpu_kernels", sort=False):
        row = {"cpu_kernels": kernels, "runs": len(part), "seeds": " ".join(str(int(s)) for s in part.seed)}
        for col in ("VS_Dice", "Cochlea_Dice", "Cochlea_Dice_every_component"):
            row[f"{col} median"] = part[col].median()
            row[f"{col} worst"] = part[col].min()
        for col in ("VS_ASSD", "Cochlea_ASSD"):
            row[f"{col} median"] = part[col].median()
            row[f"{col} worst"] = part[col].max()
        row["failed (VS < 0.5)"] = int((part.VS_Dice < FAILED_VS_DICE).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("cpu_kernels").round(4)


def seed_plot(table: pd.DataFrame) -> plt.Figure:
    """Each run's mean Dice, one point per seed, per structure (cochlea with both post-processings)."""
    import seaborn as sns

    cols = {"VS_Dice": "VS", "Cochlea_Dice": "cochlea", "Cochlea_Dice_every_component": "cochlea,\nevery component"}
    long = table.melt(id_vars=["seed", "cpu_kernels"], value_vars=list(cols), var_name="metric", value_name="Dice")
    long["metric"] = long.metric.map(cols)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.stripplot(data=long, x="metric", y="Dice", hue="cpu_kernels", ax=ax, size=7, jitter=0.15, palette="dark")
    ax.axhline(FAILED_VS_DICE, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("")
    split = table.split.iloc[0] if len(table) else ""
    ax.set_title(f"mean Dice per run ({split} split), one point per seed", fontsize=10)
    fig.tight_layout()
    return fig
