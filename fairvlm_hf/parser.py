"""Command-line parsing with YAML configs: ``--config file.yaml`` plus ``--key value`` overrides.

`HfArgumentParser` reads either the command line or a YAML file; recipes want both, with the
command line winning (as TRL's ``TrlParser`` does). Unknown YAML keys are an error that lists
them and names the file, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A YAML config that cannot be applied (unreadable, not a mapping, unknown keys)."""


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of argument names to values; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of argument names to values")
    return data


class FairVLMParser(HfArgumentParser):
    """`HfArgumentParser` that also takes ``--config FILE.yaml``; explicit flags override the file."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config",
            default=None,
            metavar="FILE.yaml",
            help="YAML file of argument values; flags given on the command line override it.",
        )

    def parse_args_and_config(
        self, args: Sequence[str] | None = None, default_config: str | Path | None = None
    ) -> tuple[Any, ...]:
        """Parse ``args`` (default ``sys.argv[1:]``) into the parser's dataclasses.

        ``default_config`` is read when ``args`` give no ``--config`` of their own.
        """
        args = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(args)
        if known.config is None and default_config is not None:
            known.config = str(default_config)
        if known.config is not None:
            config = load_yaml_config(known.config)
            valid = {action.dest for action in self._actions} - {"config", "help"}
            unknown = sorted(set(config) - valid)
            if unknown:
                raise ConfigError(
                    f"--config {known.config}: unknown keys {unknown}; "
                    "run with --help for the accepted arguments"
                )
            self.set_defaults(**config)
            for action in self._actions:
                if action.dest in config:
                    action.required = False
        *outputs, _extra, remaining = self.parse_args_into_dataclasses(
            args=args, look_for_args_file=False, return_remaining_strings=True
        )
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)
