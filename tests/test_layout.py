"""The dependency rule of DESIGN.md: pipeline <- actors <- serve, jobs. pipeline never knows Ray; actors never know HTTP."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [("pipeline", {"ray", "actors", "serve", "jobs", "fastapi", "starlette"}), ("actors", {"fastapi", "starlette", "serve", "jobs"})],
)
def test_folder_does_not_import_upper_layers(folder, forbidden):
    offenders = {f: sorted(names & forbidden) for f, names in imported_modules(folder).items() if names & forbidden}
    assert not offenders, f"{folder}/ must not import {sorted(forbidden)}: {offenders}"


def test_importing_pipeline_does_not_load_ray():
    code = "import sys, pipeline, pipeline.engine.generate; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_the_package_and_the_request_checks_do_not_load_torch():
    """Front ends check a request (mode names, token layout, audio headers) before any model starts."""
    code = ("import sys, pipeline, pipeline.tokens.vocab, pipeline.tokens.chat, pipeline.engine.schedules, pipeline.audio, "
            "actors.errors, actors.models; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
