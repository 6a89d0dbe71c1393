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
    p.add_argument("--fov", choices=("roi", "head"), default="roi", help="roi: ~100x90x44 mm around the canals (default); head: real matrix sizes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")


@command("synth", "write a synthetic cohort in the crossMoDA 2022 layout")(_setup_synth)
def _run_synth(args: argparse.Namespace) -> int:
    from crossmoda_lib import synth

    try:
        manifest = synth.generate_cohort(args.out, seed=args.seed, cases_per_centre=args.cases_per_centre, fov=args.fov, overwrite=args.overwrite)
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
    from crossmoda_lib import config, runs
    from crossmoda_lib import io as cio

    try:
        manifest = runs.run_profile(args.profile, args.only, progress=not args.no_progress)
    except (config.ProfileError, cio.DataError) as exc:
        print(f"crossmoda run: {exc}", file=sys.stderr)
        return 2
    except runs.NotebookFailed as exc:
        print(f"crossmoda run: FAILED {exc}", file=sys.stderr)
        return 1
    for nb in manifest["notebooks"]:
        print(f"{nb['notebook']}: {nb['status']} in {nb['wall_s']:.1f} s -> {nb['executed']}")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
