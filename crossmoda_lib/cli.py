"""The ``crossmoda`` command (also ``python -m crossmoda_lib``).

Sub-commands are registered in :data:`COMMANDS`; later stages add theirs with :func:`command`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help_text: str):
    """Register a sub-command: decorate ``run(args) -> exit code``; ``setup(parser)`` adds arguments."""

    def wrap(setup: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (setup, run, help_text)
            return run

        return register

    return wrap


def _setup_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="destination folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases-per-centre", type=int, default=8, help="cases per centre over the three splits (default 8: 3 source, 3 target, 2 validation)")
    p.add_argument("--test-cases-per-centre", type=int, default=0, help="hrT2 cases per centre of a held-out test/ split with truth (default 0: none)")
    p.add_argument("--fov", choices=("roi", "head"), default="roi", help="roi: ~100x90x44 mm around the canals (default); head: real matrix sizes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")


@command("synth", "write a synthetic cohort in the crossMoDA 2022 layout")(_setup_synth)
def _run_synth(args: argparse.Namespace) -> int:
    from crossmoda_lib import synth

    try:
        manifest = synth.generate_cohort(args.out, seed=args.seed, cases_per_centre=args.cases_per_centre, fov=args.fov, test_cases_per_centre=args.test_cases_per_centre, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as exc:
        print(f"crossmoda synth: {exc}", file=sys.stderr)
        return 2
    vs = [c["vs_volume_mm3"] for c in manifest["cases"]]
    print(f"wrote {len(manifest['cases'])} cases to {args.out} (seed {args.seed}, fov {args.fov}); VS volumes {min(vs):.0f}-{max(vs):.0f} mm3")
    return 0


def _setup_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="folder with training_source/, training_target/, validation/")
    p.add_argument("--quiet", action="store_true", help="print problems only")


@command("validate", "check a folder in the crossMoDA 2022 layout (writes nothing)")(_setup_validate)
def _run_validate(args: argparse.Namespace) -> int:
    from crossmoda_lib import io as cio

    report = cio.validate_dataset(args.data_dir)
    for problem in report.problems:
        print(problem, file=sys.stderr if problem.fatal else sys.stdout)
    if report.ok and not args.quiet:
        print(report.summary())
    return 0 if report.ok else 1


def _setup_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", type=Path, help="a params/*.yaml file")
    p.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="notebook stems to run, e.g. 01_preprocess")
    p.add_argument("--no-progress", action="store_true")


@command("run", "execute the notebooks headless with one profile (papermill)")(_setup_run)
def _run_run(args: argparse.Namespace) -> int:
    from crossmoda_lib import config, devices, runs
    from crossmoda_lib import io as cio

    try:
        manifest = runs.run_profile(args.profile, args.only, progress=not args.no_progress)
    except (config.ProfileError, cio.DataError, devices.DeviceError) as exc:
        print(f"crossmoda run: {exc}", file=sys.stderr)
        return 2
    except runs.NotebookFailed as exc:
        print(f"crossmoda run: FAILED {exc}", file=sys.stderr)
        return 1
    for nb in manifest["notebooks"]:
        print(f"{nb['notebook']}: {nb['status']} in {nb['wall_s']:.1f} s -> {nb['executed']}")
    return 0


def _setup_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("hrt2_dir", type=Path, help="folder of hrT2 volumes (*.nii.gz)")
    p.add_argument("out_dir", type=Path, help="where <case>_Label.nii.gz files go (not inside hrt2_dir)")
    p.add_argument("--models", type=Path, required=True, help="a model folder with inference.json (e.g. outputs/demo/08_inference/models)")
    p.add_argument("--overwrite", action="store_true", help="recompute predictions that already exist")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")


@command("predict", "segment a folder of hrT2 into crossMoDA labels on each input's own grid")(_setup_predict)
def _run_predict(args: argparse.Namespace) -> int:
    from crossmoda_lib import devices, inference
    from crossmoda_lib import io as cio

    try:
        rows = inference.predict_folder(args.hrt2_dir, args.out_dir, args.models, overwrite=args.overwrite, progress=not args.no_progress, device=args.device)
    except (cio.DataError, devices.DeviceError) as exc:
        print(f"crossmoda predict: {exc}", file=sys.stderr)
        return 2
    written = sum(r["status"] == "written" for r in rows)
    print(f"{written} written, {len(rows) - written} kept, in {args.out_dir}")
    return 0


def _setup_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred_dir", type=Path, help="predicted labels <case>_Label.nii.gz")
    p.add_argument("truth_dir", type=Path, help="ground-truth labels (<case>_Label.nii.gz or <case>_hrT2_Label.nii.gz)")
    p.add_argument("-o", "--output", type=Path, required=True, help="scores CSV to write")


@command("evaluate", "score predictions against ground truth (crossMoDA 2022 Dice, ASSD; HD95)")(_setup_evaluate)
def _run_evaluate(args: argparse.Namespace) -> int:
    from crossmoda_lib import io as cio
    from crossmoda_lib import metrics

    if args.output.is_dir() or (args.output.parent.exists() and not args.output.parent.is_dir()):
        print(f"crossmoda evaluate: {args.output}: -o must be a CSV file path, not a folder or inside a file", file=sys.stderr)
        return 2
    try:
        table = metrics.evaluate_folders(args.pred_dir, args.truth_dir)
    except cio.DataError as exc:
        print(f"crossmoda evaluate: {exc}", file=sys.stderr)
        return 2
    cio.write_text_atomic(args.output, table.to_csv(index=False))
    print(metrics.formatted_table(table[metrics.OFFICIAL_COLUMNS + ["Centre"]], ["Centre"]).to_string())
    print(f"{len(table)} cases -> {args.output}")
    return 0


def _setup_rank(p: argparse.ArgumentParser) -> None:
    p.add_argument("scores", type=Path, help="CSV with Case, Team, VS_Dice, VS_ASSD, Cochlea_Dice, Cochlea_ASSD")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for stability (0: none; papers/003: 1000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--by-centre", action="store_true", help="also rank within each centre")


@command("rank", "the crossMoDA 2022 challenge ranking of per-case team scores, with bootstrap stability")(_setup_rank)
def _run_rank(args: argparse.Namespace) -> int:
    import numpy as np

    from crossmoda_lib import io as cio
    from crossmoda_lib import ranking

    try:
        scores = ranking.read_scores(args.scores)
        table = ranking.ranking(scores)
    except cio.DataError as exc:
        print(f"crossmoda rank: {exc}", file=sys.stderr)
        return 2
    print(f"{scores.Case.nunique()} cases, {len(table)} teams; ranking score = mean over cases of the mean rank over 4 metrics")
    print(table.merge(ranking.team_summary(scores), on="Team").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.bootstrap:
        boot, taus = ranking.bootstrap(scores, args.bootstrap, args.seed)
        print(f"\nbootstrap ({args.bootstrap} samples, seed {args.seed}): Kendall tau to the full ranking median {np.median(taus):.3f}, 2.5% {np.percentile(taus, 2.5):.3f}")
        print(boot.to_string(index=False))
    if args.by_centre:
        print()
        print(ranking.per_centre(scores).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _setup_book(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default="outputs/demo", help="a finished run's output folder (default outputs/demo)")
    p.add_argument("-o", "--output", type=Path, default=None, help="site folder (default <run>/book)")


@command("book", "a static site of a finished run: index, the nine executed notebooks, results (nothing recomputed)")(_setup_book)
def _run_book(args: argparse.Namespace) -> int:
    from crossmoda_lib import book, config

    site = book.build(config.resolve_path(args.run), args.output)
    print(f"{site}: {len(list(site.glob('*.html')))} pages; open {site / 'index.html'}")
    return 0


def _setup_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["diff", "show"], help="diff: every setting two profiles give differently; show: one profile, its extends merged in")
    p.add_argument("profiles", nargs="+", help="profile files or names under params/ (demo, paper, smoke, ablations/no_tba)")


@command("profile", "compare profiles side by side (crossmoda profile diff paper demo) or show one merged")(_setup_profile)
def _run_profile(args: argparse.Namespace) -> int:
    import yaml

    from crossmoda_lib import config

    if args.action == "show":
        if len(args.profiles) != 1:
            print("crossmoda profile: show takes one profile", file=sys.stderr)
            return 2
        profile = config.load_profile(config.profile_file(args.profiles[0]))
        print(yaml.safe_dump({"common": profile["common"], "notebooks": profile["notebooks"], **({"reuse": profile["reuse"]} if profile["reuse"] else {})}, sort_keys=False), end="")
        return 0
    if len(args.profiles) != 2:
        print("crossmoda profile: diff takes two profiles", file=sys.stderr)
        return 2
    a, b = (config.load_profile(config.profile_file(p)) for p in args.profiles)
    rows = config.profile_differences(a, b)
    names = [Path(p).stem for p in args.profiles]
    width = max([len(f"{s}.{k}") for s, k, _, _ in rows] + [7])

    def shown(value) -> str:
        return "(absent)" if value is None else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    left = max([len(shown(v)) for _, _, v, _ in rows] + [len(names[0])])
    print(f"{'setting':<{width}}  {names[0]:<{left}}  {names[1]}")
    for section, key, va, vb in rows:
        print(f"{section + '.' + key:<{width}}  {shown(va):<{left}}  {shown(vb)}")
    print(f"{len(rows)} settings differ")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossmoda", description="crossMoDA 2022 companion: data, stages and evaluation.")
    from crossmoda_lib import __version__

    parser.add_argument("--version", action="version", version=f"crossmoda-companion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
        p.set_defaults(func=run)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that come from what the user gave (files, folders, profiles, devices) or from the
    machine (a full disk, a permission): one line naming the file, never a traceback."""
    from crossmoda_lib import config, devices
    from crossmoda_lib import io as cio

    return (cio.DataError, config.ProfileError, devices.DeviceError, OSError)


def describe_error(exc: BaseException) -> str:
    """The line for a user error: an operating-system error is its file and the system's reason."""
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename and exc.strerror:
        return f"{filename}: {exc.strerror}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"crossmoda {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except user_error_types() as exc:
        if args.debug:
            raise
        print(f"crossmoda {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 2
