"""Import a launchable script (of tests/scripts/ or recipes/) as a module, to reuse its builders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent / "scripts"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str) -> ModuleType:
    """The module of ``tests/scripts/<name>.py``."""
    return _load(SCRIPTS / f"{name}.py")


def load_recipe(name: str) -> ModuleType:
    """The module of ``recipes/<name>.py``, with ``recipes/`` importable as when it runs."""
    if str(RECIPES) not in sys.path:
        sys.path.append(str(RECIPES))
    return _load(RECIPES / f"{name}.py")
