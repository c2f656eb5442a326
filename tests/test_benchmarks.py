"""Smoke test of benchmarks/env_steps.py with a tiny budget, asserting on the table it prints."""

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "env_steps.py"


def test_env_steps_benchmark_prints_a_table(capsys):
    spec = importlib.util.spec_from_file_location("env_steps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--batch-sizes", "1", "3", "--repeats", "1", "--seconds", "0.01", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (sequence|immediate) \| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+)x \|$", out, re.M)
    assert [(kind, int(b)) for kind, b, *_ in rows] == [(k, b) for k in ("sequence", "immediate") for b in (1, 3)]
    for *_, native, sync, ratio in rows:
        native, sync = (float(x.replace(",", "")) for x in (native, sync))
        assert native > 0 and sync > 0 and abs(float(ratio) - native / sync) < 0.06
