"""Faults a realistic user meets: a full disk, killed processes, reused outputs, bad profiles, odd names.

Each test here reproduces one defect that the code once had (issue 29): a full disk that wrote
empty labels with exit code 0, a prediction kept for another input, workers that trained on after
their run was killed, a second run on the same folder, profiles checked late or not at all, tracebacks
where a one-line message was due, leaks between splits. The kills of a whole run during stages 02 and
06 are in tests/test_notebooks.py (they compare with its uninterrupted smoke run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from crossmoda_lib import cli, config, inference, runs
from crossmoda_lib import io as cio

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _image(seed: int = 0, shape=(20, 48, 48)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).random(shape).astype(np.float32))
    image.SetSpacing((0.6, 0.6, 1.0))
    return image


def _limited(code: str, limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python whose files cannot grow past ``limit_bytes`` (RLIMIT_FSIZE): the
    writes fail as on a full disk (EFBIG instead of ENOSPC), with no root and no tmpfs needed."""
    prelude = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))
        """
    )
    return subprocess.run([PYTHON, "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300)


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


# --------------------------------------------------------------------------------------------------
# 1. Every write is checked
# --------------------------------------------------------------------------------------------------


def test_a_full_disk_fails_the_write_and_leaves_the_old_file(tmp_path):
    """SimpleITK reports a short write on stderr and returns: the file must not be renamed into place."""
    old = _image(1)
    cio.write_image(old, tmp_path / "a.nii.gz")
    before = (tmp_path / "a.nii.gz").read_bytes()
    done = _limited(
        f"""
        import numpy as np, SimpleITK as sitk, torch
        from crossmoda_lib import io as cio
        image = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 64, 64)).astype(np.float32))
        for name, write in [("a.nii.gz", lambda p: cio.write_image(image, p)), ("b.nii.gz", lambda p: cio.write_image(image, p)),
                            ("c.pt", lambda p: cio.save_torch_atomic(p, {{"w": torch.randn(100000)}})),
                            ("d.json", lambda p: cio.write_text_atomic(p, "x" * 100000)),
                            ("e.nii.gz", lambda p: cio.write_scaled_nifti(sitk.Cast(image * 1000, sitk.sitkInt16), p, 0.5))]:
            try:
                write({str(tmp_path)!r} + "/" + name)
                print(name, "written")
            except cio.WriteError as exc:
                print(name, "WriteError", exc)
        """,
        4096,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"a.nii.gz", "b.nii.gz", "c.pt", "d.json", "e.nii.gz"}
    for name, outcome in lines.items():
        assert outcome.startswith("WriteError"), (name, outcome)
        assert name in outcome  # the message names the file
    assert (tmp_path / "a.nii.gz").read_bytes() == before, "the previous file is untouched"
    assert not any((tmp_path / n).exists() for n in ("b.nii.gz", "c.pt", "d.json", "e.nii.gz"))
    assert not _partials(tmp_path)


def test_a_writer_that_writes_nothing_is_caught(tmp_path, monkeypatch):
    """The other face of the same fault: a 0-byte file where SimpleITK claims success."""
    monkeypatch.setattr(sitk, "WriteImage", lambda image, path, compress=True: Path(path).write_bytes(b""))
    with pytest.raises(cio.WriteError, match=r"label.nii.gz: writing failed: 0 bytes written"):
        cio.write_image(_image(), tmp_path / "label.nii.gz")
    assert not any(tmp_path.iterdir())


def test_a_full_disk_ends_synth_with_one_line_and_no_partial_folder(tmp_path):
    done = _limited(
        f"""
        from crossmoda_lib import cli
        raise SystemExit(cli.main(["synth", {str(tmp_path / "data")!r}, "--cases-per-centre", "3"]))
        """,
        20000,
        tmp_path,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    message = [line for line in done.stderr.splitlines() if line.startswith("crossmoda synth:")]
    assert message and "writing failed" in message[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data.partial-*"))


def test_what_killed_writers_left_is_cleared(tmp_path):
    """A SIGTERM between mkstemp and the rename leaves a partial file; the next write of the same file,
    and a run on the folder, remove such leftovers (and a killed synth's partial folder)."""
    stale = tmp_path / ".checkpoint.pt.abc123.partial.pt"
    stale.write_bytes(b"")
    cio.save_torch_atomic(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert not stale.exists() and (tmp_path / "checkpoint.pt").is_file()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.nii.gz.zz.partial.nii.gz").write_bytes(b"\0")
    (tmp_path / ".data.partial-q1").mkdir()
    (tmp_path / ".data.partial-q1" / "f").write_text("x")
    removed = cio.remove_partials(tmp_path)
    assert len(removed) == 2 and not _partials(tmp_path) and (tmp_path / "checkpoint.pt").is_file()


def test_a_process_killed_while_writing_leaves_nothing_that_looks_finished(tmp_path):
    """SIGKILL in the middle of a checkpoint write: the old checkpoint stays, whole."""
    cio.save_torch_atomic(tmp_path / "checkpoint.pt", {"epoch": 1})
    code = f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from crossmoda_lib import io as cio
        print("ready", flush=True)
        while True:
            cio.save_torch_atomic({str(tmp_path / "checkpoint.pt")!r}, {{"epoch": 2, "w": torch.randn(3_000_000)}})
        """
    proc = subprocess.Popen([PYTHON, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    saved = cio.load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] in (1, 2)
    cio.save_torch_atomic(tmp_path / "checkpoint.pt", {"epoch": 3})  # the rerun's write clears the leftover
    assert not _partials(tmp_path)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cio.write_image(_image(), tmp_path / "a.nii.gz")
        cio.write_text_atomic(tmp_path / "b.json", "{}")
        assert (tmp_path / "a.nii.gz").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        cio.write_text_atomic(tmp_path / "c.json", "{}")
        assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_synthetic_cohort_follows_the_umask(tmp_path):
    from crossmoda_lib import synth

    old = os.umask(0o022)
    try:
        synth.generate_cohort(tmp_path / "data", seed=0, cases_per_centre=3, progress=False, workers=1)
    finally:
        os.umask(old)
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "data").rglob("*.nii.gz"))


# --------------------------------------------------------------------------------------------------
# 2. Reuse is keyed on content
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory, cohort):
    from test_inference import _toy_models

    return _toy_models(tmp_path_factory.mktemp("toy"), cohort)


def test_predict_recomputes_a_label_whose_input_was_replaced(tmp_path, cohort, toy_bundle):
    src = tmp_path / "in"
    src.mkdir()
    first, second = sorted((cohort / "validation").glob("*_hrT2.nii.gz"))[:2]
    (src / first.name).write_bytes(first.read_bytes())
    rows = inference.predict_folder(src, tmp_path / "out", toy_bundle, progress=False)
    assert [r["status"] for r in rows] == ["written"]
    label = tmp_path / "out" / inference.label_name(first.name)
    # Another volume (another size) under the same name: the old label must not be "kept".
    (src / first.name).write_bytes(second.read_bytes())
    rows = inference.predict_folder(src, tmp_path / "out", toy_bundle, progress=False)
    assert [r["status"] for r in rows] == ["written"]
    assert sitk.ReadImage(str(label)).GetSize() == sitk.ReadImage(str(second)).GetSize()
    assert [r["status"] for r in inference.predict_folder(src, tmp_path / "out", toy_bundle, progress=False)] == ["kept"]
    # A label that is there but was not recorded as made from this input (left by anything else) is remade.
    record = tmp_path / "out" / inference.PREDICTIONS_RECORD
    record.write_text("{}")
    assert [r["status"] for r in inference.predict_folder(src, tmp_path / "out", toy_bundle, progress=False)] == ["written"]


def test_predict_refuses_two_inputs_that_map_to_one_label(tmp_path, cohort, toy_bundle):
    src = tmp_path / "in"
    src.mkdir()
    path = sorted((cohort / "validation").glob("*_hrT2.nii.gz"))[0]
    (src / path.name).write_bytes(path.read_bytes())
    (src / path.name.replace("_hrT2", "")).write_bytes(path.read_bytes())
    with pytest.raises(cio.DataError, match="would both be segmented into"):
        inference.predict_folder(src, tmp_path / "out", toy_bundle, progress=False)
    assert not (tmp_path / "out").exists(), "refused before anything is written"


# --------------------------------------------------------------------------------------------------
# 3. Workers die with their run; one run per output folder
# --------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_training_workers_end_when_their_parent_is_killed(tmp_path, how):
    """The pool of stages 06-07 (spawned workers, segmentation._worker_init): kill the process that
    owns the pool, as a killed kernel is, and its workers must not train on."""
    code = f"""
        import multiprocessing as mp, os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from crossmoda_lib import segmentation

        def work(i):
            open({str(tmp_path)!r} + f"/worker{{i}}.pid", "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            pool = mp.get_context("spawn").Pool(2, initializer=segmentation._worker_init, initargs=(1,))
            results = [pool.apply_async(work, (i,)) for i in range(2)]
            time.sleep(120)
        """
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(code))
    owner = subprocess.Popen([PYTHON, str(script)], cwd=tmp_path)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("worker*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p.read_text()) for p in tmp_path.glob("worker*.pid")]
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    owner.send_signal(getattr(signal, how))
    owner.wait(timeout=30)
    deadline = time.time() + 15
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived their parent"


def test_die_with_parent_exits_at_once_when_the_parent_is_already_gone(tmp_path):
    """The race: a worker whose parent died before it set up its watch ends too."""
    child = tmp_path / "child.py"
    child.write_text(
        f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\ntime.sleep(2)  # the parent exits meanwhile\n"
        "from crossmoda_lib import devices\ndevices.die_with_parent(parent=int(sys.argv[1]))\n"
        f"open({str(tmp_path / 'survived')!r}, 'w').write('yes')\n"
    )
    parent = f"import os, subprocess, sys\nsubprocess.Popen([sys.executable, {str(child)!r}, str(os.getpid())])\n"
    subprocess.run([PYTHON, "-c", parent], check=True, timeout=60)
    time.sleep(6)
    assert not (tmp_path / "survived").exists()


def test_a_second_run_on_the_same_output_folder_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen(
        [
            PYTHON,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from crossmoda_lib import io as cio\n"
            f"with cio.folder_lock({str(tmp_path / 'out')!r}, 'crossmoda run params/demo.yaml'):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        profile = _profile(tmp_path, output_dir=str(tmp_path / "out"))
        with pytest.raises(cio.FolderLocked, match=rf"another process works in this folder \(pid {holder.pid}, crossmoda run params/demo.yaml"):
            runs.run_profile(profile, ["01_preprocess"], progress=False)
        assert not (tmp_path / "data").exists(), "refused before the data is prepared"
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no lock behind.
    with cio.folder_lock(tmp_path / "out"):
        pass


# --------------------------------------------------------------------------------------------------
# 4. One schema for profiles, checked before any work
# --------------------------------------------------------------------------------------------------


def _profile(tmp_path: Path, name: str = "p.yaml", notebooks: dict | None = None, **common) -> Path:
    """The smoke profile with its folders in ``tmp_path`` and the given changes."""
    profile = config.merged_profile(ROOT / "params" / "smoke.yaml")
    profile["common"].update(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "outputs"))
    profile["common"].update(common)
    for stem, section in (notebooks or {}).items():
        if section is None:
            profile["notebooks"][stem] = None
        else:
            profile["notebooks"].setdefault(stem, {}).update(section)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("common", "notebooks", "message"),
    [
        ({"seed": "zero"}, None, r"common.seed must be an integer, not 'zero'"),
        ({"seed": -1}, None, r"common.seed=-1 must be >= 0"),
        ({"synth_fov": "brain"}, None, r"common.synth_fov='brain' must be one of \['roi', 'head'\]"),
        ({}, {"02_cyclegan": {"n_epochs": "one"}}, r"notebooks.02_cyclegan.n_epochs must be an integer, not 'one'"),
        ({}, {"06_segmentation": {"epochs": -1}}, r"notebooks.06_segmentation.epochs=-1 must be >= 1"),
        ({}, {"06_segmentation": {"patch_size": [24, 80]}}, r"patch_size=\[24, 80\] must have 3 items, not 2"),
        ({}, {"06_segmentation": {"optimizer": "adamw"}}, r"optimizer='adamw' must be one of \['sgd', 'adam'\]"),
        ({}, {"06_segmentation": {"mirror_tta": "yes"}}, r"mirror_tta must be true or false, not 'yes'"),
        ({}, {"02_cyclegan": {"lr": 0.0}}, r"02_cyclegan.lr=0.0 must be > 0"),
        ({}, {"08_inference": {"splits": ["validation", "tset"]}}, r"splits=\['validation', 'tset'\] item 1 \('tset'\) must be one of"),
        ({}, {"01_preprocess": {"spacing": [0.6, "a", 1.0]}}, r"01_preprocess.spacing item 1 must be a number, not 'a'"),
    ],
)
def test_bad_values_are_refused_before_any_work_naming_file_and_key(tmp_path, common, notebooks, message):
    path = _profile(tmp_path, **common, notebooks=notebooks)
    with pytest.raises(config.ProfileError, match=rf"p.yaml: .*{message}"):
        runs.run_profile(path, progress=False)
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists(), "nothing is written"


def test_a_float_key_takes_an_integer_and_an_empty_section_means_no_change(tmp_path):
    path = _profile(tmp_path, notebooks={"02_cyclegan": {"lambda_cycle": 10}, "03_translate": None})
    profile = config.load_profile(path)
    assert profile["notebooks"]["03_translate"] == {}
    declared = runs.declared_parameters(ROOT / "notebooks" / "02_cyclegan.ipynb")
    assert config.notebook_parameters(profile, "02_cyclegan", declared)["lambda_cycle"] == 10


def test_extends_chains_of_any_depth_and_loops_named(tmp_path):
    base = _profile(tmp_path, "base.yaml")
    (tmp_path / "mid.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "common": {"seed": 3}}))
    (tmp_path / "top.yaml").write_text(yaml.safe_dump({"extends": "mid.yaml", "notebooks": {"02_cyclegan": {"ngf": 4}}}))
    top = config.load_profile(tmp_path / "top.yaml")
    assert top["common"]["seed"] == 3 and top["notebooks"]["02_cyclegan"]["ngf"] == 4
    assert top["notebooks"]["02_cyclegan"]["ndf"] == yaml.safe_load(base.read_text())["notebooks"]["02_cyclegan"]["ndf"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"extends": "b.yaml"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"extends": "a.yaml"}))
    with pytest.raises(config.ProfileError, match=r"'extends' loops: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        config.load_profile(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"extends": "missing.yaml"}))
    with pytest.raises(config.ProfileError, match="missing.yaml: profile file not found"):
        config.load_profile(tmp_path / "c.yaml")


def test_every_shipped_profile_passes_the_schema():
    for path in sorted((ROOT / "params").rglob("*.yaml")):
        profile = config.load_profile(path)
        for nb in runs.discover_notebooks():
            config.notebook_parameters(profile, nb.stem, runs.declared_parameters(nb))


def test_every_schema_rule_names_a_declared_key():
    """A rule for a key that no notebook declares would check nothing (a renamed parameter)."""
    from crossmoda_lib import schema

    declared = {nb.stem: runs.declared_parameters(nb) for nb in runs.discover_notebooks()}
    for stem, rules in schema.RULES.items():
        assert stem in declared
        assert set(rules) <= set(declared[stem]), (stem, sorted(set(rules) - set(declared[stem])))
    assert set(schema.COMMON) == {*config.COMMON_KEYS, *config.OPTIONAL_COMMON}
    # Allowed values written in the schema agree with the code that uses them.
    from crossmoda_lib import segmentation as seg

    for key in ("vs_sets", "cochlea_sets"):
        assert schema.RULES["06_segmentation"][key].items.choices == seg.TRAINING_SETS, key
    assert set(schema.RULES["07_self_training"]["warm_start"].items.choices) == set(seg.STRUCTURES)
    assert set(schema.RULES["08_inference"]["splits"].items.choices) == set(cio.SPLITS) - {"training_source", "training_target"}


# --------------------------------------------------------------------------------------------------
# 5. No traceback for a user's mistake
# --------------------------------------------------------------------------------------------------


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    return code, err


def test_cli_errors_are_one_line_naming_the_file(tmp_path, capsys, cohort, toy_bundle):
    # predict with a truncated checkpoint
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle.parent, tmp_path / "toy")
    bundle = tmp_path / "toy" / toy_bundle.name
    ckpt = next((tmp_path / "toy" / "models" / "vs").rglob("checkpoint.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, err = _cli(capsys, "predict", cohort / "validation", tmp_path / "pred", "--models", bundle, "--no-progress")
    assert code == 2 and "checkpoint.pt: not a readable checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # evaluate on names without a centre
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    label = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    cio.write_image(label, tmp_path / "t" / "case1_Label.nii.gz")
    cio.write_image(label, tmp_path / "p" / "case1_Label.nii.gz")
    code, err = _cli(capsys, "evaluate", tmp_path / "p", tmp_path / "t", "-o", tmp_path / "s.csv")
    assert code == 2 and "without a centre in the name" in err and "case1_Label.nii.gz" in err
    # evaluate -o a folder
    code, err = _cli(capsys, "evaluate", tmp_path / "p", tmp_path / "t", "-o", tmp_path)
    assert code == 2 and "-o must be a CSV file path" in err
    # rank on an empty and on a non-numeric CSV
    (tmp_path / "empty.csv").write_text("")
    code, err = _cli(capsys, "rank", tmp_path / "empty.csv")
    assert code == 2 and "empty.csv: not a readable CSV" in err
    (tmp_path / "text.csv").write_text("Case,Team,VS_Dice,VS_ASSD,Cochlea_Dice,Cochlea_ASSD\na,t,high,1,1,1\n")
    code, err = _cli(capsys, "rank", tmp_path / "text.csv")
    assert code == 2 and "column VS_Dice has non-numeric value(s), e.g. 'high' in row 2" in err
    (tmp_path / "header.csv").write_text("Case,Team,VS_Dice,VS_ASSD,Cochlea_Dice,Cochlea_ASSD\n")
    code, err = _cli(capsys, "rank", tmp_path / "header.csv")
    assert code == 2 and "no rows of scores" in err
    # an output path that is a file
    (tmp_path / "afile").write_text("x")
    code, err = _cli(capsys, "predict", cohort / "validation", tmp_path / "afile", "--models", toy_bundle)
    assert code == 2 and "afile: is a file" in err
    profile = _profile(tmp_path, output_dir=str(tmp_path / "afile"))
    code, err = _cli(capsys, "run", profile, "--only", "01_preprocess", "--no-progress")
    assert code == 2 and "afile: is a file" in err and "Traceback" not in err


def test_an_os_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    def unreadable(*_, **__):
        raise PermissionError(13, "Permission denied", str(tmp_path / "data" / "validation"))

    monkeypatch.setattr(cio, "validate_dataset", unreadable)
    code, err = _cli(capsys, "validate", tmp_path)
    assert code == 2 and err.strip() == f"crossmoda validate: {tmp_path / 'data' / 'validation'}: Permission denied"
    with pytest.raises(PermissionError):
        cli.main(["--debug", "validate", str(tmp_path)])


def test_a_bug_is_still_a_traceback(monkeypatch):
    """Only user errors are shortened: a programming error must stay visible."""
    monkeypatch.setattr(cio, "validate_dataset", lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["validate", "x"])


# --------------------------------------------------------------------------------------------------
# 6. The validator: one case in two splits, ambiguous numbers
# --------------------------------------------------------------------------------------------------


def _reasons(report: cio.ValidationReport, name: str) -> list[str]:
    return [p.reason for p in report.errors if Path(p.path).name == name]


def test_a_case_in_two_splits_is_a_leak(cohort_copy):
    target = sorted((cohort_copy / "training_target").glob("*_hrT2.nii.gz"))[0]
    leak = cohort_copy / "validation" / target.name
    leak.write_bytes(target.read_bytes())
    reasons = _reasons(cio.validate_dataset(cohort_copy), target.name)
    assert any("also in training_target/" in r and "leak" in r for r in reasons), reasons


def test_one_number_written_two_ways_and_non_ascii_digits_are_refused(cohort_copy):
    path = sorted((cohort_copy / "validation").glob("*_hrT2.nii.gz"))[0]
    _, centre, _ = cio.parse_case_name(path.name)
    number = int(path.name.split("_")[2])
    padded = cohort_copy / "training_target" / path.name.replace(f"_{number}_", f"_0{number}_")
    padded.write_bytes(path.read_bytes())
    arabic = cohort_copy / "training_target" / path.name.replace(f"_{number}_", "_" + "".join(chr(0x0660 + int(d)) for d in str(number + 1)) + "_")
    arabic.write_bytes(path.read_bytes())
    report = cio.validate_dataset(cohort_copy)
    assert any("same number written two ways" in r for r in _reasons(report, padded.name) + _reasons(report, path.name)), [str(p) for p in report.errors]
    assert any("non-ASCII digits" in r for r in _reasons(report, arabic.name))


def test_two_runs_that_share_a_data_folder_generate_it_once(tmp_path):
    """Runs with their own output folders but one synthetic data folder: the second waits for the
    first's cohort instead of generating (and replacing) it under the first's feet."""
    code = f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from crossmoda_lib import config
        config.prepare_data("synthetic", {str(tmp_path / "data")!r}, 0, 3, "roi")
        print("ok")
        """
    procs = [subprocess.Popen([PYTHON, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert cio.validate_dataset(tmp_path / "data").ok
    assert not list(tmp_path.glob(".data.partial-*"))


def test_stage_01_redoes_its_work_when_an_input_was_replaced_under_its_name(cohort_copy, tmp_path):
    from crossmoda_lib import preprocess as pp

    cfg = pp.PreprocessConfig((0.6, 0.6, 1.0), (176, 144))
    stage = tmp_path / "01_preprocess"
    pp.preprocess_dataset(cohort_copy, stage, cfg, progress=False)
    first = sorted((cohort_copy / "validation").glob("*_hrT2.nii.gz"))[0]
    out = stage / "validation" / first.name
    before = out.read_bytes()
    pp.preprocess_dataset(cohort_copy, stage, cfg, progress=False)
    assert out.read_bytes() == before, "unchanged inputs: the finished stage is kept"
    image = sitk.ReadImage(str(first))
    cio.write_image(sitk.Cast(sitk.InvertIntensity(image, float(np.max(sitk.GetArrayViewFromImage(image)))), image.GetPixelID()), first)  # other voxels, same name
    pp.preprocess_dataset(cohort_copy, stage, cfg, progress=False)
    assert out.read_bytes() != before
