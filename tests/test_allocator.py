"""textrl.allocator: glibc's malloc keeps freed large blocks for reuse (set once per process, by the agents on a
CPU; ``TEXTRL_MALLOC_TUNE=0`` leaves it alone). Each case runs in a process of its own: the setting is global."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# rounds of ten 4 MiB tensors, written and freed: page faults per round after the first
SCRIPT = """
import json, resource, torch
from textrl import allocator
tuned = allocator.keep_freed_blocks()
assert allocator.keep_freed_blocks() == tuned  # once per process, the same answer after
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1 << 20) for _ in range(10)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "later_faults": sum(faults[1:])}))
"""


def _run(switch: str) -> dict:
    env = dict(os.environ, TEXTRL_MALLOC_TUNE=switch)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_new_page_faults():
    """Tuned, the second and later rounds reuse the first round's pages; under glibc's defaults they fault
    (the freed blocks went back to the system) several times as often."""
    tuned, default = _run("1"), _run("0")
    assert tuned["tuned"] is True and default["tuned"] is False
    assert tuned["later_faults"] * 2 < default["later_faults"], (tuned, default)
