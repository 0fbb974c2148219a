"""Inside a clone, `kernels/` and `parallel/` sit on sys.path as top-level names; they must not hide the PyPI
packages of those names (transformers >= 5.25 imports Hugging Face's `kernels`), nor stop being megagen's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python_in_clone(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c` started in the repository root, which puts the root first on sys.path."""
    env = {**os.environ, "PYTHONPATH": str(extra_path) if extra_path else ""}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name", ["kernels", "parallel"])
def test_the_installed_package_of_that_name_is_imported(tmp_path, name):
    other = tmp_path / name
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the other package'\n")
    (other / "layer.py").write_text("from . import WHO\n")
    code = (
        f"import sys; assert sys.path[0] in ('', {str(ROOT)!r}), sys.path[:2]\n"
        f"import {name}, {name}.layer\n"
        f"assert {name}.WHO == 'the other package' and {name}.layer.WHO == {name}.WHO\n"
        f"assert {name}.__file__ == {str(other / '__init__.py')!r}, {name}.__file__\n"
        f"import megagen.{name} as ours\n"
        f"assert ours.__file__ == {str(ROOT / name / '__init__.py')!r}, ours.__file__\n"
    )
    ran = python_in_clone(code, tmp_path)
    assert ran.returncode == 0, ran.stderr


@pytest.mark.parametrize("name", ["kernels", "parallel"])
def test_without_one_the_import_fails_as_a_missing_module(name):
    code = (
        "try:\n"
        f"    import {name}\n"
        "except ModuleNotFoundError as exc:\n"
        f"    assert exc.name == {name!r} and 'megagen.{name}' in str(exc), exc\n"
        "else:\n"
        f"    raise SystemExit('imported ' + {name}.__file__)\n"
        f"import megagen.{name}\n"
    )
    ran = python_in_clone(code)
    if ran.returncode != 0 and "imported" in ran.stderr and "site-packages" in ran.stderr:
        pytest.skip(f"a {name} package is installed here")
    assert ran.returncode == 0, ran.stderr
