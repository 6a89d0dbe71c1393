"""Stage 07's settings and its resume rule (the rounds themselves run in the smoke notebook tests)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from crossmoda_lib import selftraining


def test_settings_are_checked():
    with pytest.raises(ValueError, match="rounds"):
        selftraining.SelfTrainingConfig(rounds=-1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cochlea_components"):
            selftraining.SelfTrainingConfig(cochlea_components=bad)
    assert selftraining.SelfTrainingConfig().cochlea_components == 0  # the paper: every component
    for bad in (True, "vs", ("vs", "brain")):
        with pytest.raises(ValueError, match="warm_start"):
            selftraining.SelfTrainingConfig(warm_start=bad)
    assert selftraining.SelfTrainingConfig(warm_start=["vs"]).warm_start == ("vs",)  # a YAML list
    assert selftraining.SelfTrainingConfig().warm_start == ()  # the paper: from scratch


def test_a_finished_round_is_reused_only_with_the_same_settings(tmp_path):
    """A round finished before a setting existed is reused when the setting keeps its default (what
    the round was made with), and refused, naming the folder, when it does not."""
    cfg = selftraining.SelfTrainingConfig(rounds=2, round_epochs=3, final_epochs=3, folds=1)
    out = selftraining.round_dir(tmp_path, 1)
    out.mkdir(parents=True)
    older = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "cochlea_components"}
    (out / "manifest.json").write_text(json.dumps({"settings": older, "round": 1}))
    missing = tmp_path / "absent"  # nothing else is read for a finished round
    assert selftraining.run_round(1, cfg, missing, missing, missing, tmp_path, progress=False)["round"] == 1
    for changed in (replace(cfg, cochlea_components=2), replace(cfg, round_epochs=4)):
        with pytest.raises(ValueError, match="round_1"):
            selftraining.run_round(1, changed, missing, missing, missing, tmp_path, progress=False)
    (out / "manifest.json").write_text(json.dumps({"settings": {**older, "a_setting_this_version_lacks": 1}, "round": 1}))
    with pytest.raises(ValueError, match="round_1"):  # only missing settings take their default
        selftraining.run_round(1, cfg, missing, missing, missing, tmp_path, progress=False)


def test_warm_start_with_another_network_is_refused_before_any_pseudo_label(tmp_path):
    """A final round at a finer spacing plans another network (the z axis keeps kernel 1 at 0.4 mm):
    warm-starting it from the teacher is refused, naming the teacher's folder, before round 1's
    teacher segments anything (the data folder does not even exist)."""
    from crossmoda_lib import preprocess as pp
    from crossmoda_lib import segmentation as seg

    stage01, stage06 = tmp_path / "01", tmp_path / "06"
    stage01.mkdir()
    (stage01 / "manifest.json").write_text(json.dumps({"settings": json.loads(json.dumps(asdict(pp.PreprocessConfig())))}))
    teacher = seg.SegConfig(spacing=(1.0, 0.6, 0.6), patch_size=(16, 32, 32), base_filters=4, max_filters=16)
    for structure in seg.STRUCTURES:
        (stage06 / structure).mkdir(parents=True)
        (stage06 / structure / "manifest.json").write_text(json.dumps({"settings": teacher.as_dict(), "folds": 1, "training_pairs": []}))
    cfg = selftraining.SelfTrainingConfig(rounds=0, round_epochs=1, final_epochs=1, final_spacing=(0.4, 0.4, 1.0), folds=1, warm_start=("vs",))  # round 1 is the final model
    with pytest.raises(ValueError, match=r"06/vs: cannot warm-start"):
        selftraining.run_round(1, cfg, tmp_path / "no_data", stage01, stage06, tmp_path / "07", progress=False)
    assert not (tmp_path / "07").exists()
    same_grid = replace(cfg, final_spacing=(0.6, 0.6, 1.0))  # passes the check, then needs the data
    with pytest.raises(Exception, match="no_data"):
        selftraining.run_round(1, same_grid, tmp_path / "no_data", stage01, stage06, tmp_path / "07", progress=False)


def test_the_papers_schedule_three_rounds_then_the_final_model():
    """papers/000: "we repeat this self training stage iteratively two more times" (three rounds of
    pseudo-labels and retraining after stage 06), then "the last segmentation model was trained for
    1000 epochs using real hrT2 with the last best pseudo labels only": four trainings."""
    paper = selftraining.SelfTrainingConfig()
    assert paper.rounds == 3 and paper.trained_rounds == 4 and paper.final_epochs == 1000
    assert selftraining.SelfTrainingConfig(rounds=0).trained_rounds == 1  # the final model from stage 06's pseudo-labels
    assert selftraining.SelfTrainingConfig(self_training=False).trained_rounds == 0  # stage 06's models are final
    # The 95th-percentile clip is "to also facilitate the first cochlear segmentation stages".
    assert selftraining.clip_percentile(paper, "cochlea", final=False) == 95.0
    assert selftraining.clip_percentile(paper, "cochlea", final=True) is None
    assert selftraining.clip_percentile(replace(paper, cochlea_clip_final=True), "cochlea", final=True) == 95.0
    assert selftraining.clip_percentile(paper, "vs", final=False) is None
