"""Smoke tests of the benchmark scripts: each ``--quick`` run completes and writes its section.

The scripts run as a user runs them (a subprocess, tiny sizes, one thread) against a temporary
copy of ``docs/benchmarks.md``; the tests check the section between the script's markers and
that nothing else in the file changed. No timing is asserted. The shared helpers are tested
against hand-worked examples.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DOCS = ROOT / "docs" / "benchmarks.md"

sys.path.insert(0, str(BENCHMARKS))
import _common  # noqa: E402


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert match is not None, f"no {name} section"
    return match.group(1)


def _outside(text: str, name: str) -> str:
    return re.sub(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", "", text, flags=re.S)


@pytest.fixture()
def doc_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "benchmarks.md"
    copy.write_text(DOCS.read_text(encoding="utf-8"), encoding="utf-8")
    return copy


def _run(script: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1"]
    command += ["--output", str(output), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("script", "name", "header"),
    [
        ("objective_overhead.py", "objective_overhead", "| variant | ms/step, batch 8 |"),
        ("scaling.py", "scaling", "| batch | losses | sinkhorn (ms) | exact_1d (ms) |"),
        ("data_pipeline.py", "data_pipeline", "| loader | num_workers | epoch (s) |"),
    ],
)
def test_quick_run_writes_its_section_only(doc_copy: Path, script: str, name: str, header: str):
    before = doc_copy.read_text(encoding="utf-8")
    result = _run(script, doc_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    after = doc_copy.read_text(encoding="utf-8")
    section = _section(after, name)
    assert header in section
    assert header in result.stdout
    assert "torch threads 1" in section
    assert f"- command: `python benchmarks/{script} --quick --threads 1 --output" in section
    assert re.search(r"- date: \d{4}-\d{2}-\d{2}", section)
    # Everything outside this section is as it was (other sections, introduction).
    assert _outside(after, name).strip() == _outside(before, name).strip()
    if f"<!-- {name}:start -->" in before:
        assert after.count(f"<!-- {name}:start -->") == 1


def test_gpu_script_refuses_without_cuda(doc_copy: Path, capsys: pytest.CaptureFixture):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    import gpu_throughput

    before = doc_copy.read_text(encoding="utf-8")
    assert gpu_throughput.main(["--output", str(doc_copy)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert doc_copy.read_text(encoding="utf-8") == before


@pytest.mark.parametrize(
    "module", ["objective_overhead", "scaling", "data_pipeline", "gpu_throughput"]
)
def test_every_script_has_the_common_options(module: str):
    parser = __import__(module).build_parser()
    text = parser.format_help()
    for option in ("--quick", "--repeats", "--threads", "--output"):
        assert option in text
    args = parser.parse_args([])
    assert args.output == _common.DEFAULT_OUTPUT
    with pytest.raises(SystemExit):
        _common.check_common_arguments(parser, parser.parse_args(["--repeats", "0"]))


def test_repeats_default_depends_on_quick():
    parser = __import__("scaling").build_parser()
    full = parser.parse_args([])
    _common.check_common_arguments(parser, full)
    quick = parser.parse_args(["--quick"])
    _common.check_common_arguments(parser, quick)
    assert (full.repeats, quick.repeats) == (3, 1)


def test_write_section_replaces_between_markers_only(tmp_path: Path):
    path = tmp_path / "doc.md"
    path.write_text("# T\n\nintro\n\n<!-- a:start -->\nold\n<!-- a:end -->\n\ntail\n")
    _common.write_section(path, "a", "new table\n")
    assert (
        path.read_text() == "# T\n\nintro\n\n<!-- a:start -->\nnew table\n<!-- a:end -->\n\ntail\n"
    )
    _common.write_section(path, "b", "other")
    assert path.read_text().endswith("tail\n\n<!-- b:start -->\nother\n<!-- b:end -->\n")
    assert "<!-- a:start -->\nnew table\n<!-- a:end -->" in path.read_text()


def test_write_section_rejects_broken_markers(tmp_path: Path):
    path = tmp_path / "doc.md"
    path.write_text("<!-- a:start -->\nx\n")
    with pytest.raises(ValueError, match="once each"):
        _common.write_section(path, "a", "y")
    path.write_text("<!-- a:end -->\n<!-- a:start -->\n")
    with pytest.raises(ValueError, match="comes before"):
        _common.write_section(path, "a", "y")


def test_rounds_rotate_the_order_and_drop_warmup():
    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = _common.rounds(variants, repeats=3, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_self_timed_rounds_use_the_returned_time():
    values = iter([9.0, 1.0, 2.0, 3.0])
    times = _common.rounds({"x": lambda: next(values)}, repeats=3, warmup=1, self_timed=True)
    assert times == {"x": [1.0, 2.0, 3.0]}
    with pytest.raises(TypeError, match="self-timed"):
        _common.rounds({"x": lambda: None}, repeats=1, warmup=0, self_timed=True)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # Per-round ratios 1.1, 3.0, 1.2: median 1.2, whereas the ratio of medians is 4 / 2 = 2.
    assert _common.ratio_of_rounds([2.2, 9.0, 4.8], [2.0, 3.0, 4.0]) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        _common.ratio_of_rounds([1.0], [1.0, 2.0])


def test_markdown_table_and_command_line():
    table = _common.markdown_table(["a", "b"], [[1, "x"]], "lr")
    assert table == "| a | b |\n| --- | ---: |\n| 1 | x |"
    with pytest.raises(ValueError):
        _common.markdown_table(["a", "b"], [[1]], "lr")
    assert (
        _common.command_line("scaling.py", ["--quick", "--output", "a b.md"])
        == "python benchmarks/scaling.py --quick --output 'a b.md'"
    )
