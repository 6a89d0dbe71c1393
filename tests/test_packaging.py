"""Install metadata, the CLI entry points, and what CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_pyproject_and_environment_yml_carry_the_same_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    assert all("==" in d for d in project["dependencies"]), "every dependency is pinned exactly"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _pins(pip_section)
    assert py == conda
    assert py["torch"] == "2.13.0"
    assert "python=3.11" in env["dependencies"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "./run_all.sh test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./run_all\.sh test$", ci, re.M)


def test_the_linter_passes_on_code_tests_benchmarks_and_notebooks():
    """`ruff check` with the configuration of pyproject.toml ([tool.ruff]: line length 200, pyflakes,
    pycodestyle, isort, pyupgrade, bugbear), notebooks included: what CI enforces."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert config["line-length"] == 200 and "*.ipynb" in config["extend-include"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_project_never_reads_the_developers_shared_folder():
    pattern = re.compile(r"\.\./shared|/work/shared")
    for path in [*ROOT.glob("crossmoda_lib/*.py"), *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("params/*.yaml"), *ROOT.glob("benchmarks/*.py"), ROOT / "run_all.sh"]:
        assert not pattern.search(path.read_text()), path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossmoda_lib", *args], capture_output=True, text=True, timeout=300)


def test_cli_lists_its_commands():
    result = _cli("--help")
    assert result.returncode == 0
    for name in ("synth", "validate", "run"):
        assert name in result.stdout
    assert "crossmoda-companion 0.1.0" in _cli("--version").stdout


def test_cli_synth_writes_a_valid_cohort_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cohort"
    result = _cli("synth", str(out), "--seed", "3", "--cases-per-centre", "3")
    assert result.returncode == 0, result.stderr
    assert "wrote 6 cases" in result.stdout
    assert _cli("validate", str(out), "--quiet").returncode == 0
    again = _cli("synth", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cohort.partial")]
