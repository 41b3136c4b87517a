"""Dependencies run one way, downward: the client at the bottom, the daemons' kit and the persona core above it,
the daemons on top, none of them importing another daemon. Read from every module's import statements, lazy
imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# each package -> the project's packages it may import (besides itself)
ALLOWED = {
    "model_client": set(),
    "daemonkit": {"model_client"},
    "model_manager": {"model_client", "daemonkit"},
    "personas": {"model_client", "daemonkit"},
    "services": {"model_client", "daemonkit", "personas"},
    "agents": {"model_client", "daemonkit", "personas"},
    "gateway": {"model_client", "daemonkit", "personas"},
}


def imported_packages(source: str) -> set[str]:
    """The project's top-level packages that ``source`` imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def arrows_up(package: str, source: str) -> set[str]:
    return imported_packages(source) - ALLOWED[package] - {package}


def test_no_package_imports_one_above_it_or_beside_it() -> None:
    wrong = {}
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            if bad := arrows_up(package, path.read_text(encoding="utf-8")):
                wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert not wrong, wrong


def test_the_check_sees_a_planted_arrow_up() -> None:
    planted = "def talk():\n    from agents.talk import talk\n    return talk\n"
    assert arrows_up("model_client", planted) == {"agents"}
    assert arrows_up("services", "import agents.persona\n") == {"agents"}
    assert arrows_up("agents", "from services.stt import service\n") == {"services"}
    assert arrows_up("agents", "from personas.turn import PersonaTurn\n") == set()


def test_every_package_of_the_project_is_placed() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench", "scripts"}
    assert packages == set(ALLOWED), packages ^ set(ALLOWED)
    assert Path(REPO / "pyproject.toml").read_text().count('"personas*"') == 1, "installed with the rest"
