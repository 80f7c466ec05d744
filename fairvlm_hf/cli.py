"""The ``fairvlm-hf`` command: one entry point, one sub-command per task.

Each sub-command lives beside the code it drives and takes its own ``argv``; this module only
dispatches, so that ``fairvlm-hf --help`` stays fast (nothing heavy is imported until needed).
"""

from __future__ import annotations

import importlib
import sys

#: sub-command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": (
        "fairvlm_hf.data.synthetic",
        "cli_main",
        "write a synthetic data set in the Harvard-FairVLMed layout",
    ),
    "evaluate": (
        "fairvlm_hf.evaluation",
        "cli_main",
        "zero-shot glaucoma evaluation with the per-group fairness report",
    ),
    "push-metric": (
        "fairvlm_hf.hub",
        "push_metric_cli_main",
        "publish the ES-AUC metric as a Hugging Face Space",
    ),
}


def _usage() -> str:
    lines = ["usage: fairvlm-hf COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `fairvlm-hf COMMAND --help` for the arguments of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a sub-command and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        sys.stdout.write(_usage() + "\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"fairvlm-hf: unknown command {name!r}\n\n{_usage()}\n")
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
