"""Import a launchable script of tests/scripts/ as a module, so tests can reuse its builders."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def load_script(name: str) -> ModuleType:
    """The module of ``tests/scripts/<name>.py``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
