"""Helpers shared by the benchmark scripts: options, timing, the machine, the docs section.

Every script times its variants in rounds, one call of each variant per round in a rotating
order, so that a burst of load from elsewhere on the machine hits all variants alike; it reports
medians over rounds and, for comparisons, the median of the per-round ratios. Its markdown table
goes to stdout and into ``docs/benchmarks.md`` between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``, with the date, the machine, the load average and the exact command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
DEFAULT_THREADS = 2


def new_parser(doc: str, *, repeats: int) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring, with the common options added."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, repeats=repeats)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """Add ``--quick``, ``--repeats``, ``--threads`` and ``--output`` to ``parser``."""
    parser.set_defaults(full_repeats=repeats)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run with tiny sizes (still writes its table to --output)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed rounds per measurement; the tables show medians (default: {repeats}, "
        "1 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch intra-op threads, set explicitly and reported (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="markdown file whose section of this benchmark is replaced (default: "
        "docs/benchmarks.md)",
    )


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the default ``--repeats`` and reject impossible values, naming the option."""
    if args.repeats is None:
        args.repeats = 1 if args.quick else args.full_repeats
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count and return the value torch reports back."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def rounds(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    *,
    self_timed: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Each round calls every variant once; round ``r`` starts at variant ``r mod V`` so that no
    variant always runs first (right after a warm-up or after the heaviest one). With
    ``self_timed`` each variant returns its own time in seconds (see :func:`per_call`).
    """
    names = list(variants)
    if not names:
        raise ValueError("rounds: no variants to time")
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            returned = variants[name]()
            elapsed = time.perf_counter() - start
            if self_timed:
                if not isinstance(returned, float):
                    raise TypeError(f"rounds: self-timed variant {name!r} returned {returned!r}")
                elapsed = returned
            if index >= warmup:
                times[name].append(elapsed)
    return times


def per_call(function: Callable[[], object], min_seconds: float = 0.02) -> Callable[[], float]:
    """A timer for fast calls: returns the mean seconds of one call over a loop of at least
    ``min_seconds`` (the loop length is fixed at the first use)."""
    loops: list[int] = []

    def run() -> float:
        if not loops:
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_seconds or count == 0:
                function()
                count += 1
            loops.append(count)
        start = time.perf_counter()
        for _ in range(loops[0]):
            function()
        return (time.perf_counter() - start) / loops[0]

    return run


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio_of_rounds(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]`` (paired: same round, same load)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"paired ratio needs two equally long, non-empty lists, got {len(numerator)} and "
            f"{len(denominator)}"
        )
    return median([n / d for n, d in zip(numerator, denominator, strict=True)])


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's processor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine(threads: int) -> str:
    """Platform, CPU, CPU count, Python and torch versions, and the torch thread count."""
    return (
        f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}, torch {torch.__version__}, torch threads {threads}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    """A markdown table; ``align`` holds one of ``l``/``r`` per column."""
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError("markdown_table: every row and align need one entry per header")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, e.g. ``python benchmarks/scaling.py --quick``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, arguments)]).strip()


def small_op_probe(threads: int, calls: int = 30) -> tuple[float, float]:
    """Median microseconds of ``torch.exp`` on 4,096 floats with ``threads`` threads and with 1.

    On an idle machine both are a few microseconds. When other processes occupy the cores,
    the multi-threaded call waits for a worker thread to be scheduled (milliseconds): every
    parallel operator then pays that wait, which inflates small-tensor work such as Sinkhorn
    iterations far more than large matrix products. The footer of every section reports it.
    """
    x = torch.randn(4096)
    out = []
    for count in (threads, 1):
        torch.set_num_threads(count)
        torch.exp(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            torch.exp(x)
            times.append(time.perf_counter() - start)
        out.append(median(times) * 1e6)
    torch.set_num_threads(threads)
    return out[0], out[1]


class RunInfo:
    """Start time and load of a run, and the footer that closes its docs section."""

    def __init__(self, script: str, argv: Sequence[str] | None, threads: int) -> None:
        self.command = command_line(script, argv)
        self.threads = threads
        self.load_start = load_average()
        self.probe_threads = max(2, threads)
        self.probe_start = small_op_probe(self.probe_threads)
        torch.set_num_threads(threads)
        self.start = time.perf_counter()

    def footer(self) -> list[str]:
        """Date, machine, load average at start and end, wall time and the exact command."""
        load_end = load_average()
        if self.load_start is None or load_end is None:
            load = "not available on this platform"
        else:
            load = (
                f"{self.load_start:.2f} at the start, {load_end:.2f} at the end "
                f"(1-minute; the machine's {os.cpu_count()} CPUs are shared)"
            )
        wall = time.perf_counter() - self.start
        probe_end = small_op_probe(self.probe_threads)
        torch.set_num_threads(self.threads)
        probe = ", ".join(
            f"{label} {many:,.0f} µs with {self.probe_threads} threads, {one:,.0f} µs with 1"
            for label, (many, one) in (("start", self.probe_start), ("end", probe_end))
        )
        return [
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {machine(self.threads)}",
            f"- load average: {load}",
            f"- small-operator probe (`torch.exp` on 4,096 floats; far slower with several "
            f"threads than with 1 means the cores were oversubscribed): {probe}",
            f"- wall time of the run: {wall:.0f} s",
            f"- command: `{self.command}`",
        ]


def write_section(path: Path, name: str, section: str) -> None:
    """Put ``section`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Everything outside the markers is left as it is; a file without the markers gets them
    appended at its end, a missing file is created with a title.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    has_start, has_end = start in text, end in text
    if has_start != has_end or text.count(start) > 1 or text.count(end) > 1:
        raise ValueError(
            f"{path}: the markers {start} and {end} must appear once each (found "
            f"{text.count(start)} and {text.count(end)})"
        )
    if has_start:
        before, rest = text.split(start, 1)
        if end not in rest:
            raise ValueError(f"{path}: {end} comes before {start}")
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def publish(name: str, section: str, output: Path) -> None:
    """Print ``section`` and write it into ``output`` between the markers of ``name``."""
    sys.stdout.write(section.rstrip() + "\n")
    write_section(output, name, section)
    sys.stdout.write(f"\nwritten to {output} (section {name})\n")


def format_ms(seconds: float) -> str:
    """Milliseconds with three significant figures at most, e.g. ``1234`` or ``0.512``."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"
