"""Is the demo's result a draw? The whole profile, run for several seeds, scored on the test split.

One run of the pipeline is one draw: the seed drives the synthetic cohort, the CycleGAN (and its
draw gate), the SinGAN and the segmentation networks, and the CPU's kernel family gives another
training path again (docs/running.md). This benchmark runs a profile (the demo by
default) once per seed, each into its own output folder, plus seed 0 with ``cpu_kernels: native``,
and writes one row per run to ``<root>/seeds.csv`` (:data:`crossmoda_lib.report.SEED_COLUMNS`):

* mean VS and cochlea Dice / ASSD on the reported split (09's ``split``: ``test`` in the demo),
  the cochlea with the run's post-processing and with the paper's (every component: the same
  models, predicted again with ``cochlea_components: 0``), and per centre;
* ``translation_score``: the VS oracle of ``bench_translation_quality.py`` (trained on the run's
  real hrT2 with the synthetic truth, which the method never sees) applied to the run's pseudo-hrT2;
* ``vs_band_dice``: the draw gate's criterion on the run's pseudo-hrT2 (source labels only);
* ``draw``: the CycleGAN draw the gate chose; ``wall_min``: notebooks 01-09.

It prints, after every run, the table so far and the median, the worst run and the failure rate
(VS Dice < 0.5), never the best seed (:func:`crossmoda_lib.report.seed_summary`), and draws
``<root>/seeds.png``. Notebook 09 shows the same table and plot when ``seeds.csv`` exists.

    .venv/bin/python benchmarks/bench_seeds.py [--profile params/demo.yaml] [--seeds 0 1 2 3 4]
        [--native-seeds 0] [--root outputs/benchmarks/seeds]

Resumable: a run that stopped (a killed benchmark, a session's end) continues where it was, since
every stage resumes or reuses its checkpoints; a finished run's row is kept in
``<root>/seed<s>_<kernels>/bench_seeds/row.json`` and not recomputed. A demo run takes 35-60 minutes on
a 2-core CPU (docs/results.md): start it in the background (``nohup ... &``) and read the log.

Kept across checkouts: ``outputs/`` is not committed, so each finished row is also written to
``--record`` (``benchmarks/results/seeds/seed<s>_<kernels>.json``, committed), with the git commit
it ran on and ``code``, a hash of what decides the numbers (the syntax of the library modules a
run executes and of the notebooks' code, this benchmark, the loaded profile: :func:`code_stamp`). A later call takes a recorded row instead of running the seed
again only when its ``code`` is the current one; a row of other code is run again (and its record
replaced), so the table never mixes code versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # bench_translation_quality


def run_profile_file(base: Path, seed: int, kernels: str, root: Path) -> Path:
    """The profile of one run: ``base`` with this seed and kernels, its own data and output folders,
    no ablations to compare and no seed table of its own."""
    import yaml

    from crossmoda_lib import config

    name = config.load_profile(base)["common"]["profile"]
    run_dir = root / f"seed{seed}_{kernels}"
    profile = {
        "extends": str(base.resolve()),
        "common": {"profile": f"{name}_seed{seed}_{kernels}", "seed": seed, "cpu_kernels": kernels, "data_dir": str(run_dir / "data"), "output_dir": str(run_dir)},
        "notebooks": {"09_evaluation": {"ablation_dirs": [], "seeds_table": ""}},
    }
    path = root / "profiles" / f"seed{seed}_{kernels}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(profile, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def finished(run_dir: Path) -> bool:
    """Every notebook of the run executed successfully (``run_manifest.json``)."""
    manifest = run_dir / "run_manifest.json"
    if not manifest.exists():
        return False
    saved = json.loads(manifest.read_text())
    names = {Path(n["notebook"]).stem for n in saved["notebooks"] if n["status"] == "ok"} | set(saved.get("reused") or [])
    return bool(saved.get("finished")) and {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")} <= names


def code_stamp(root: Path = ROOT, profile: Path | None = None) -> str:
    """sha256 (16 hex digits) of what decides a run's numbers, so that a recorded row is reused only
    by the same computation: the syntax trees of the ``crossmoda_lib`` modules a run executes
    (:func:`library_modules`), of the notebooks' code
    cells and of this benchmark and its translation score (comments, docstrings and layout left out,
    so that reformatting or rewording keeps the rows), the bytes of ``crossmoda_lib/reference``, and
    the benchmarked profile as loaded (its ``extends`` chain merged; default ``params/demo.yaml``)."""
    import hashlib

    import nbformat

    from crossmoda_lib import config

    digest = hashlib.sha256()

    def add(name: str, payload: bytes) -> None:
        digest.update(name.encode() + b"\0" + payload + b"\0")

    notebooks = {path: [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"] for path in sorted((root / "notebooks").glob("*.ipynb"))}
    benches = [root / "benchmarks" / "bench_seeds.py", root / "benchmarks" / "bench_translation_quality.py"]
    used = library_modules(root, [*(c for cells in notebooks.values() for c in cells), *(p.read_text() for p in benches)])
    for path in [*(root / "crossmoda_lib" / f"{m}.py" for m in sorted(used)), *benches]:
        add(str(path.relative_to(root)), syntax(path.read_text()).encode())
    for path in sorted((root / "crossmoda_lib" / "reference").glob("*")):
        if path.is_file():
            add(str(path.relative_to(root)), path.read_bytes())
    for path, cells in notebooks.items():
        add(str(path.relative_to(root)), "\0".join(syntax(c) for c in cells).encode())
    loaded = config.load_profile(profile or root / "params" / "demo.yaml")
    add("profile", json.dumps({k: v for k, v in loaded.items() if k != "path"}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


#: what ``crossmoda run`` executes the notebooks with, whatever the notebooks import
RUNNER = ("__init__", "runs", "config", "schema")


def library_modules(root: Path, sources: list[str]) -> set[str]:
    """The ``crossmoda_lib`` modules a run executes: those the given sources (the notebooks' code
    cells, the benchmark) import, the runner's, and whatever those import in turn, lazily too. Not
    ``cli`` nor a module nothing of the run imports: a new command does not change a run's numbers."""
    import ast

    def imported(source: str) -> set[str]:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return set()
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "crossmoda_lib":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("crossmoda_lib."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("crossmoda_lib.")}
        return {m for m in found if (root / "crossmoda_lib" / f"{m}.py").is_file()}

    todo = set(RUNNER).union(*(imported(s) for s in sources))
    done: set[str] = set()
    while todo:
        module = todo.pop()
        done.add(module)
        todo |= imported((root / "crossmoda_lib" / f"{module}.py").read_text()) - done
    return done


def syntax(source: str) -> str:
    """Python source as its syntax tree without docstrings (``ast.dump``); source that does not
    parse (a notebook magic) is taken as it is."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def recorded(record: Path | None, seed: int, kernels: str, code: str) -> dict | None:
    """The committed row of this run when it was made by the same code (:func:`code_stamp`), else None."""
    path = None if record is None else record / f"seed{seed}_{kernels}.json"
    if path is None or not path.exists():
        return None
    row = json.loads(path.read_text())
    return row if row.get("code") == code else None


def every_component_bundle(models: Path, out: Path) -> Path:
    """A copy of a run's ``08_inference/models`` bundle that keeps every cochlea component (the
    paper's post-processing), pointing at the same model folders."""
    from crossmoda_lib import inference
    from crossmoda_lib import io as cio

    payload = inference.read_bundle_file(models)
    out.mkdir(parents=True, exist_ok=True)
    moved = {k: os.path.relpath((models / payload[k]).resolve(), out.resolve()) for k in ("vs", "cochlea")}
    cio.write_text_atomic(out / inference.BUNDLE_FILE, json.dumps({**payload, **moved, "cochlea_components": 0}, indent=2) + "\n")
    return out


def translation_scores(run_dir: Path, oracle_iterations: int) -> dict:
    """The VS oracle's mean Dice and the gate's criterion on the run's pseudo-hrT2 (source cases)."""
    import bench_translation_quality as btq
    import numpy as np
    import SimpleITK as sitk

    from crossmoda_lib import segmentation as seg
    from crossmoda_lib import translation as tr

    stage01, stage03 = run_dir / "01_preprocess", run_dir / "03_translate" / "pseudo_hrT2"
    cfg = btq.oracle_config(stage01, oracle_iterations)
    net, _ = seg.train(btq.oracle_cases(stage01, "target", "vs"), [], cfg, run_dir / "bench_seeds" / "oracle_vs", progress=False)
    dice, contrast = [], []
    for path in sorted(stage03.glob("*_pseudoT2.nii.gz")):
        image = sitk.ReadImage(str(path))
        pseudo = sitk.GetArrayFromImage(image).astype(np.float32)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace("_pseudoT2", "_Label"))) == 1
        if not label.any():
            continue
        dice += btq.score(net, cfg, [seg.Case(path.name, pseudo, label.astype(np.uint8))], "vs")
        contrast.append(tr.vs_measures(pseudo, label, image.GetSpacing()[::-1])[tr.DRAW_CRITERION])
    return {"translation_score": float(np.mean(dice)), "vs_band_dice": float(np.mean(contrast))}


def summarise(run_dir: Path, seed: int, kernels: str, *, code: str, oracle_iterations: int = 250) -> dict:
    """One row of ``seeds.csv`` for a finished run (kept in ``bench_seeds/row.json``)."""
    import pandas as pd

    from crossmoda_lib import inference, metrics, report

    saved = run_dir / "bench_seeds" / "row.json"
    if saved.exists():
        return json.loads(saved.read_text())
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    evaluation = manifest["parameters"]["notebooks"].get("09_evaluation", {})
    split = evaluation.get("split", "test")
    data = Path(manifest["data_dir"])
    truth = Path(evaluation["truth_dir"]) if evaluation.get("truth_dir") else data / "synthetic_truth"
    scores = pd.read_csv(run_dir / "09_evaluation" / "scores.csv")
    bundle = every_component_bundle(run_dir / "08_inference" / "models", run_dir / "bench_seeds" / "models_every_component")
    predictions = run_dir / "bench_seeds" / "predictions_every_component"
    inference.predict_folder(data / split, predictions, bundle, progress=False)
    every = metrics.evaluate_folders(predictions, truth, list(scores.Case))
    cyclegan = json.loads((run_dir / "02_cyclegan" / "manifest.json").read_text())
    wall = sum(n["wall_s"] for n in manifest["notebooks"] if n["status"] == "ok") / 60.0
    row = report.seed_row(
        scores,
        every,
        seed=seed,
        cpu_kernels=kernels,
        split=split,
        draw=cyclegan.get("draw", 0),
        wall_min=round(wall, 1),
        commit=manifest.get("git_commit", "unknown"),
        code=code,
        **translation_scores(run_dir, oracle_iterations),
    )
    from crossmoda_lib import io as cio

    cio.write_text_atomic(saved, json.dumps(row, indent=2) + "\n")
    return row


def write_table(rows: list[dict], root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from crossmoda_lib import figures, report
    from crossmoda_lib import io as cio

    table = pd.DataFrame(rows, columns=list(report.SEED_COLUMNS))
    cio.write_text_atomic(root / "seeds.csv", table.to_csv(index=False))
    figures.save_figure(report.seed_plot(table), root / "seeds")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(3).to_string(index=False))
        print(report.seed_summary(table).to_string())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="params/demo.yaml", help="the profile every run extends")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds run with the profile's own cpu_kernels")
    ap.add_argument("--native-seeds", type=int, nargs="*", default=[0], help="seeds also run with cpu_kernels: native (none: --native-seeds)")
    ap.add_argument("--root", default="outputs/benchmarks/seeds", help="one folder per run, seeds.csv and seeds.png")
    ap.add_argument("--record", default="benchmarks/results/seeds", help="finished rows are also kept here (committed; '' for none)")
    ap.add_argument("--oracle-iterations", type=int, default=250, help="training iterations of the translation score's VS oracle (a multiple of 25)")
    args = ap.parse_args(argv)

    from crossmoda_lib import config

    base = config.resolve_path(args.profile)
    root = config.resolve_path(args.root)
    record = config.resolve_path(args.record) if args.record else None
    code = code_stamp(profile=base)
    own = config.load_profile(base)["common"]["cpu_kernels"]
    jobs = [(s, own) for s in args.seeds] + [(s, "native") for s in args.native_seeds if own != "native"]
    print(f"{len(jobs)} runs of {args.profile} into {root}: " + ", ".join(f"seed {s} ({k})" for s, k in jobs), flush=True)
    rows = []
    for seed, kernels in jobs:
        run_dir = root / f"seed{seed}_{kernels}"
        kept = recorded(record, seed, kernels, code)
        if kept is not None and not finished(run_dir):
            print(f"seed {seed} ({kernels}): recorded in {record} by this code (commit {kept['commit']})", flush=True)
            rows.append(kept)
            write_table(rows, root)
            continue
        if not finished(run_dir):
            profile = run_profile_file(base, seed, kernels, root)
            log = root / f"seed{seed}_{kernels}.log"
            t0 = time.perf_counter()
            print(f"seed {seed} ({kernels}): running (log {log})", flush=True)
            with log.open("a") as fh:
                done = subprocess.run([sys.executable, "-m", "crossmoda_lib", "run", str(profile)], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
            if done.returncode != 0 or not finished(run_dir):
                print(f"seed {seed} ({kernels}): the run failed (exit {done.returncode}); see {log}", flush=True)
                continue
            print(f"seed {seed} ({kernels}): finished in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        row = summarise(run_dir, seed, kernels, code=code, oracle_iterations=args.oracle_iterations)
        rows.append(row)
        write_table(rows, root)
        if record is not None:
            from crossmoda_lib import io as cio

            record.mkdir(parents=True, exist_ok=True)
            cio.write_text_atomic(record / f"seed{seed}_{kernels}.json", json.dumps(row, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
