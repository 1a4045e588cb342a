"""The layers point one way (engine <- jobs <- workers), checked twice: on the import
statements of every module, those inside functions too (a lazy import is still an
arrow), and on what importing the modules in a fresh interpreter really loads."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules_of(package: str) -> list[str]:
    folder = ROOT / package
    return [package] + [f"{package}.{info.name}" for info in pkgutil.iter_modules([str(folder)])
                        if info.name != "__main__"]


def pulled_in(*modules: str) -> set[str]:
    """Top-level packages loaded by importing modules in a fresh interpreter."""
    code = (f"import sys, json, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            f"print(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def imported_names(package: str) -> dict[str, set[str]]:
    """Module file -> every module name its import statements name, at any depth."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {path: sorted(n for n in names if n.split(".")[0] in forbidden or n in forbidden)
            for path, names in imported_names(package).items()
            if any(n.split(".")[0] in forbidden or n in forbidden for n in names)}


def test_no_import_statement_points_up_a_layer():
    assert offending("engine", ("jobs", "workers", "celery", "kombu", "pyarrow")) == {}
    assert offending("jobs", ("workers", "celery", "kombu")) == {}


def test_the_engine_never_imports_jobs_workers_or_celery():
    # Every module at once: what none of them may import, all of them together do not.
    assert not pulled_in(*modules_of("engine")) & {"jobs", "workers", "celery", "kombu",
                                                   "pyarrow"}


def test_jobs_never_import_workers_or_celery():
    assert not pulled_in(*modules_of("jobs")) & {"workers", "celery", "kombu"}


TORCH_FREE = ["jobs.spec", "jobs.input_file", "jobs.store", "jobs.file_store", "jobs.s3_store", "jobs.results", "jobs.manifest", "jobs.outcomes",
              "jobs.progress", "jobs.submit"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_reading_and_validating_jobs_needs_no_torch(module):
    assert "torch" not in pulled_in(module)
    statements = imported_names("jobs")[module.replace(".", "/") + ".py"]
    assert not statements & {"torch", "engine", "engine.llm", "jobs.runner"}
