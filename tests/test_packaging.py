"""The project is an installed package (launch/bootstrap.sh runs `pip install -e .`): pyproject.toml lists every
package directory, the venv's diffmoe_scale is this tree, and the scripts import it from any working directory
without touching sys.path."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([REPO / "pretrain_diffmoe.py", *REPO.glob("launch/*.py"), *REPO.glob("benchmarks/*.py")])


def run_elsewhere(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python ARGS` from another directory, with no PYTHONPATH to find the package by."""
    env = {name: value for name, value in clean_env().items() if name != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_list_names_every_package_directory():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = [".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "diffmoe_scale").rglob("__init__.py")]
    assert sorted(listed) == sorted(on_disk)


def test_the_installed_package_is_this_tree(tmp_path):
    result = run_elsewhere(["-c", "import diffmoe_scale; print(diffmoe_scale.__file__)"], tmp_path)
    assert result.returncode == 0, f"not installed (run launch/bootstrap.sh): {result.stderr[-1000:]}"
    assert Path(result.stdout.strip()) == REPO / "diffmoe_scale" / "__init__.py"


def test_no_script_touches_the_import_path():
    assert [script.name for script in SCRIPTS if "sys.path" in script.read_text()] == []


# A script of each directory, started as a user starts it: its directory, not the package's, is first on the
# path. (The others run in other tests; no other test runs benchmarks/consolidation_memory.py.)
@pytest.mark.parametrize("script", ["launch/checkpoint.py", "benchmarks/consolidation_memory.py"])
def test_a_script_starts_from_another_directory(script, tmp_path):
    result = run_elsewhere([str(REPO / script), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
