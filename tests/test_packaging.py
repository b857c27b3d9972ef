"""Packaging invariants: environment.yml mirrors pyproject; the CLI starts without torch; the package ships
neither the benchmarks (bench/) nor what they measured (results/)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from fnmatch import fnmatch

import yaml

from tests.conftest import REPO


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + list(meta["optional-dependencies"]["dev"])
    return {r.replace(" ", "") for r in reqs}


def _environment_requirements() -> set[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {r.replace(" ", "") for r in pip_section if not r.startswith("-e")}


def test_environment_yml_mirrors_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_environment_yml_python_matches_requires_python():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python" + meta["requires-python"]]


def test_package_ships_neither_bench_nor_results():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    assert any(fnmatch("protein_lm", pattern) for pattern in include)
    assert not any(fnmatch(name, pattern) for pattern in include for name in ("bench", "bench.experiments", "results"))
    sources = [src for files in setuptools["data-files"].values() for src in files]
    assert sources and not [src for src in sources if src.startswith(("bench/", "results/"))]
    manifest = REPO / "MANIFEST.in"  # an sdist takes whatever it grafts
    assert not manifest.exists() or not any(w in manifest.read_text() for w in ("bench", "results"))


def test_top_level_help_does_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "from protein_lm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    rc = main(['--help'])\n"
        "assert rc == 0 and 'fit' in out.getvalue() and 'prepare' in out.getvalue()\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_unknown_command_exits_2():
    res = subprocess.run(
        [sys.executable, "-m", "protein_lm", "no-such-command"], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "unknown command" in res.stderr
