"""The crossMoDA 2022 ranking reproduced from the organisers' per-case test scores (papers/003)."""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from crossmoda_lib import cli, ranking
from crossmoda_lib import io as cio

# Published ranking scores (papers/003, organisers' slides): ne2e 3.0, MAI 3.4, LaTIM 3.8.
PUBLISHED = {"ne2e": 3.0, "MAI": 3.4, "LaTIM": 3.8}
# Published median [IQR] of the top 5 (papers/003, "Comparison with full supervision"): VS Dice %.
PUBLISHED_VS_DICE_MEDIAN = {"ne2e": 86.1, "MAI": 87.3, "LaTIM": 86.8, "Super_Polymerization": 86.6, "A*DA": 86.7}
SHA256 = "e39ad4b71d4191bc57c09333927909d2227c15ec8f51344d1b49297ee9784da8"


def test_the_shipped_reference_is_the_organisers_file():
    data = resources.files("crossmoda_lib").joinpath("reference", ranking.REFERENCE_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256
    scores = ranking.reference_scores()
    assert scores.shape == (3252, 6) and scores.Team.nunique() == 12 and scores.Case.nunique() == 271


def test_the_published_ranking_is_reproduced():
    table = ranking.ranking(ranking.reference_scores())
    assert list(table.Team[:5]) == ["ne2e", "MAI", "LaTIM", "Super_Polymerization", "A*DA"]
    for team, published in PUBLISHED.items():
        score = table.set_index("Team").score[team]
        assert abs(score - published) <= 0.05, (team, score)
    assert table.set_index("Team").score["LaTIM"] == pytest.approx(3.816, abs=1e-3)


def test_published_medians_of_the_top_five():
    summary = ranking.team_summary(ranking.reference_scores()).set_index("Team")
    for team, median in PUBLISHED_VS_DICE_MEDIAN.items():
        assert float(summary.loc[team, "VS_Dice"].split()[0]) == pytest.approx(median, abs=0.1), team


def test_ranks_on_a_constructed_example():
    # Two cases, three teams; team B ties team C on case 1 VS Dice (average rank 2.5).
    rows = [
        ("c1", "A", 0.9, 0.3, 0.8, 0.2), ("c1", "B", 0.8, 0.5, 0.7, 0.3), ("c1", "C", 0.8, 0.4, 0.9, 0.1),
        ("c2", "A", 0.7, 0.6, 0.8, 0.2), ("c2", "B", 0.9, 0.2, 0.9, 0.1), ("c2", "C", 0.5, 0.9, 0.7, 0.3),
    ]
    scores = pd.DataFrame(rows, columns=["Case", "Team", "VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD"])
    ranks = ranking.case_ranks(scores).set_index(["Case", "Team"])
    assert ranks.loc[("c1", "B"), "rank_VS_Dice"] == 2.5 and ranks.loc[("c1", "B"), "rank_VS_ASSD"] == 3.0
    # A: c1 (1+1+2+2)/4 = 1.5, c2 (2+2+2+2)/4 = 2 -> 1.75; B: c1 (2.5+3+3+3)/4 = 2.875, c2 1 -> 1.9375.
    table = ranking.ranking(scores).set_index("Team")
    assert table.score["A"] == pytest.approx(1.75) and table.score["B"] == pytest.approx(1.9375)
    assert list(ranking.ranking(scores).Team) == ["A", "B", "C"]
    with pytest.raises(cio.DataError, match="B has 1 of 2"):
        ranking.ranking(scores.drop(index=4))


def test_bootstrap_is_seeded_and_stable_for_the_challenge():
    scores = ranking.reference_scores()
    table, taus = ranking.bootstrap(scores, n=200, seed=1)
    table2, taus2 = ranking.bootstrap(scores, n=200, seed=1)
    assert np.array_equal(taus, taus2) and table.equals(table2)
    assert list(table.Team[:3]) == ["ne2e", "MAI", "LaTIM"]
    assert np.median(taus) > 0.85  # "excellent" stability (papers/003)
    assert table.set_index("Team").loc["ne2e", "place_97.5%"] <= 3


def test_per_centre_and_placing_our_scores():
    scores = ranking.reference_scores()
    centres = ranking.per_centre(scores)
    assert set(centres.Centre) == {"London", "Tilburg"} and (centres.groupby("Centre").Team.count() == 12).all()
    ours = scores[scores.Team == "LaTIM"].drop(columns="Team")
    joined = ranking.with_our_scores(scores, ours, "this run")
    assert joined.Team.nunique() == 13
    with pytest.raises(cio.DataError, match="not comparable"):
        ranking.with_our_scores(scores, ours.iloc[:10], "this run")


def test_rank_command(tmp_path, capsys):
    path = tmp_path / "scores.csv"
    ranking.reference_scores().to_csv(path, index=False)
    assert cli.main(["rank", str(path), "--bootstrap", "50", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.index("ne2e") < out.index("MAI") < out.index("LaTIM") and "Kendall" in out
    assert cli.main(["rank", str(tmp_path / "missing.csv")]) == 2
