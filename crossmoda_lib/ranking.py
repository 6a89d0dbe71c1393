"""The crossMoDA 2022 challenge ranking (papers/003), its bootstrap stability and per-centre tables.

Ranking (BraTS-style, as the organisers describe it): for every test case, the teams are ranked on
each of the four metrics (VS Dice and cochlea Dice: higher is better; VS ASSD and cochlea ASSD: lower
is better; ties share their average rank); a team's ranks are averaged over the four metrics for
each case, then over cases. The lowest score wins. On the organisers' per-case test scores
(:func:`reference_scores`) this gives ne2e 2.95, MAI 3.38, LaTIM 3.82: the published 3.0, 3.4, 3.8.

Stability: cases are resampled with replacement (1000 bootstrap samples in papers/003), the ranking
recomputed, and Kendall's tau between each bootstrap ranking and the full ranking summarised. The
per-case mean ranks do not depend on which cases are drawn, so a bootstrap sample only re-averages
them, which makes 1000 samples take milliseconds.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from crossmoda_lib import io as cio

METRICS = {"VS_Dice": False, "VS_ASSD": True, "Cochlea_Dice": False, "Cochlea_ASSD": True}  # name -> lower is better
REFERENCE_FILE = "crossmoda2022_score_test.csv"


def reference_scores() -> pd.DataFrame:
    """The organisers' per-case test scores of the 12 teams (shipped copy; see reference/README.md)."""
    with resources.files("crossmoda_lib").joinpath("reference", REFERENCE_FILE).open() as fh:
        return pd.read_csv(fh)


def read_scores(path: Path | str) -> pd.DataFrame:
    """A scores CSV with ``Case``, ``Team`` and the four metric columns; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise cio.DataError(f"{path}: scores file not found")
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise cio.DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from exc
    missing = [c for c in ("Case", "Team", *METRICS) if c not in table.columns]
    if missing:
        raise cio.DataError(f"{path}: lacks column(s) {missing}")
    if table.empty:
        raise cio.DataError(f"{path}: no rows of scores")
    for column in METRICS:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        if bad.any():
            raise cio.DataError(f"{path}: column {column} has non-numeric value(s), e.g. {table.loc[bad, column].iloc[0]!r} in row {int(bad.idxmax()) + 2}")
        table[column] = values
    bad = table[list(METRICS)].isna().any(axis=1)
    if bad.any():
        raise cio.DataError(f"{path}: missing metric values for {int(bad.sum())} row(s), e.g. {table.loc[bad, 'Case'].iloc[0]} of {table.loc[bad, 'Team'].iloc[0]}")
    return table


def _check_complete(scores: pd.DataFrame) -> None:
    counts = scores.groupby("Team").Case.nunique()
    n = scores.Case.nunique()
    short = counts[counts < n]
    if len(short):
        raise cio.DataError(f"every team must be scored on the same cases: {', '.join(f'{t} has {c} of {n}' for t, c in short.items())}")
    dup = scores.duplicated(["Team", "Case"])
    if dup.any():
        raise cio.DataError(f"duplicate rows for {scores.loc[dup, 'Team'].iloc[0]} / {scores.loc[dup, 'Case'].iloc[0]}")


def case_ranks(scores: pd.DataFrame) -> pd.DataFrame:
    """Per case and team: the rank on each metric and their mean (``case_rank``)."""
    _check_complete(scores)
    out = scores[["Case", "Team"]].copy()
    for metric, lower_better in METRICS.items():
        out[f"rank_{metric}"] = scores.groupby("Case")[metric].rank(ascending=lower_better, method="average")
    out["case_rank"] = out[[f"rank_{m}" for m in METRICS]].mean(axis=1)
    return out


def ranking(scores: pd.DataFrame) -> pd.DataFrame:
    """Teams ordered by ranking score (mean over cases of the per-case mean rank), with their place."""
    ranks = case_ranks(scores)
    table = ranks.groupby("Team").case_rank.mean().rename("score").reset_index()
    table = table.sort_values(["score", "Team"]).reset_index(drop=True)
    table.insert(0, "place", np.arange(1, len(table) + 1))
    return table


def bootstrap(scores: pd.DataFrame, n: int = 1000, seed: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """Ranking stability under case resampling.

    Returns:
        Per team: full-data place, median bootstrap place, 2.5-97.5% place interval, frequency of
        keeping its place; and Kendall's tau of every bootstrap ranking against the full one.
    """
    from scipy.stats import kendalltau

    matrix = case_ranks(scores).pivot(index="Case", columns="Team", values="case_rank")
    full = matrix.mean(axis=0)
    teams = list(full.sort_values().index)
    values = matrix[teams].to_numpy()
    full_places = np.arange(1, len(teams) + 1)
    rng = np.random.default_rng(seed)
    places = np.empty((n, len(teams)), dtype=int)
    taus = np.empty(n)
    for b in range(n):
        mean = values[rng.integers(0, len(values), len(values))].mean(axis=0)
        order = np.argsort(mean, kind="stable")
        places[b, order] = np.arange(1, len(teams) + 1)
        taus[b] = kendalltau(full_places, places[b]).statistic
    table = pd.DataFrame({
        "Team": teams,
        "place": full_places,
        "bootstrap_median_place": np.median(places, axis=0),
        "place_2.5%": np.percentile(places, 2.5, axis=0),
        "place_97.5%": np.percentile(places, 97.5, axis=0),
        "same_place_freq": (places == full_places).mean(axis=0),
    })
    return table, taus


def team_summary(scores: pd.DataFrame, percent: bool = True) -> pd.DataFrame:
    """Median [q25 - q75] per team and metric (Dice in % when ``percent``), as in the organisers' slides."""
    rows = []
    for team, g in scores.groupby("Team", sort=False):
        row = {"Team": team}
        for metric in METRICS:
            is_dice = metric.endswith("Dice")
            v = g[metric] * (100 if percent and is_dice else 1)
            digits = 1 if is_dice else 2
            row[metric] = f"{v.median():.{digits}f} [{v.quantile(0.25):.{digits}f} - {v.quantile(0.75):.{digits}f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def per_centre(scores: pd.DataFrame) -> pd.DataFrame:
    """The ranking computed within each centre (London, Tilburg): team, centre, place, score."""
    scores = scores.assign(Centre=scores.Case.map(cio.centre_of))
    parts = [ranking(g.drop(columns="Centre")).assign(Centre=centre) for centre, g in scores.groupby("Centre")]
    return pd.concat(parts, ignore_index=True)[["Centre", "place", "Team", "score"]]


def with_our_scores(reference: pd.DataFrame, ours: pd.DataFrame, team: str) -> pd.DataFrame:
    """The reference scores with ours added as one more team, only when ours cover exactly the same
    cases (otherwise the ranks would compare different images: raises :class:`DataError`)."""
    if set(ours.Case) != set(reference.Case):
        raise cio.DataError(f"our scores cover {ours.Case.nunique()} cases, the reference {reference.Case.nunique()}; {len(set(ours.Case) & set(reference.Case))} in common: not comparable")
    return pd.concat([reference, ours[["Case", *METRICS]].assign(Team=team)], ignore_index=True)
