#!/usr/bin/env bash
# Headless reproduction of crossmoda-companion.
#
#   ./run_all.sh             run every notebook with params/demo.yaml (the default profile)
#   ./run_all.sh smoke       ... with params/smoke.yaml (any params/<name>.yaml, or a path to a YAML file)
#   ./run_all.sh test [ARGS] install, then run the test suite (pytest ARGS)
#   ./run_all.sh book [NAME] a static site of that profile's finished run (default demo): outputs/<profile>/book
#   ./run_all.sh --only 09_evaluation    re-run some notebooks of the demo profile (extra options go to crossmoda run)
#
# Creates .venv with the pinned dependencies on first use (and again when pyproject.toml changes),
# generates the synthetic cohort when the profile's data folder is empty, executes the notebooks
# through papermill into outputs/<profile>/executed/, and stops at the first failing notebook.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${CROSSMODA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for cand in python3.11 python3; do
      if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
    done
  fi
  [ -n "$PY" ] || { echo "run_all.sh: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "run_all.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); 3.11 is required (set PYTHON=...)" >&2
    exit 2
  fi
  echo "run_all.sh: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

# (Re)install when the pins change. torch goes first and exactly pinned, so that no later
# requirement can make pip resolve a newer (CUDA, several GB) build.
STAMP="$VENV/.crossmoda-installed"
WANT=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "run_all.sh: installing pinned dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi

target=${1:-demo}
case "$target" in
  -*)  # options only (e.g. --only 09_evaluation): the default profile
    set -- demo "$@"
    target=demo
    ;;
esac
case "$target" in
  test)
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  book)  # ./run_all.sh book [profile]: the site of that profile's finished run (default demo)
    shift
    run=$("$VENV/bin/python" -c 'import sys; from crossmoda_lib import config; print(config.load_profile(sys.argv[1])["common"]["output_dir"])' "params/${1:-demo}.yaml")
    exec "$VENV/bin/python" -m crossmoda_lib book "$run"
    ;;
  *.yaml|*.yml)
    profile=$target
    ;;
  *)
    profile="params/$target.yaml"
    ;;
esac
[ -f "$profile" ] || { echo "run_all.sh: no profile $profile (available: $(ls params | tr '\n' ' '))" >&2; exit 2; }
shift || true
exec "$VENV/bin/python" -m crossmoda_lib run "$profile" "$@"
