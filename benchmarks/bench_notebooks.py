"""Wall time of every notebook in the smoke and demo profiles (and any other run), side by side.

Reads ``outputs/<profile>/run_manifest.json`` written by ``./run_all.sh <profile>``; run the profiles
first. Prints one column per run, the total, and the demo/smoke ratio per notebook.

    .venv/bin/python benchmarks/bench_notebooks.py [outputs/smoke outputs/demo ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crossmoda_lib import config


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or [config.resolve_path(f"outputs/{p}") for p in ("smoke", "demo")]
    runs = {}
    for folder in folders:
        path = folder / "run_manifest.json"
        if not path.is_file():
            print(f"{path}: missing (run ./run_all.sh {folder.name} first)")
            continue
        manifest = json.loads(path.read_text())
        runs[manifest["profile"]] = {Path(n["notebook"]).stem: n["wall_s"] for n in manifest["notebooks"] if n["status"] == "ok"}
    if not runs:
        return
    names = sorted({nb for r in runs.values() for nb in r})
    print(f"{'notebook':22}" + "".join(f"{p + ' s':>14}" for p in runs) + ("   demo/smoke" if {"demo", "smoke"} <= set(runs) else ""))
    for nb in names:
        row = f"{nb:22}" + "".join(f"{r.get(nb, float('nan')):14.1f}" for r in runs.values())
        if {"demo", "smoke"} <= set(runs) and nb in runs["demo"] and nb in runs["smoke"]:
            row += f"   x{runs['demo'][nb] / runs['smoke'][nb]:.1f}"
        print(row)
    print(f"{'total (min)':22}" + "".join(f"{sum(r.values()) / 60:14.1f}" for r in runs.values()))


if __name__ == "__main__":
    main()
