"""Retained host memory: a freed activation-sized buffer is reused instead of faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A fresh interpreter per case: the malloc settings are process-wide and cannot be undone.
PROGRAM = """
import resource, sys
import torch
from vision.engine.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else False
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()).eval()
x = torch.rand(1, 3, 512, 512)
with torch.inference_mode():
    for _ in range(2):  # the first passes map their buffers either way
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        net(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(retain: bool) -> tuple[bool, int]:
    env = dict(os.environ, VISION_RETAIN_FREED_MEMORY="1")
    out = subprocess.run([sys.executable, "-c", PROGRAM, "1" if retain else "0"], capture_output=True, text=True,
                         env=env, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_buffers_are_reused_not_faulted_in_again() -> None:
    applied, retained = _faults(retain=True)
    if not applied:
        pytest.skip("not glibc")
    _, default = _faults(retain=False)
    activations = 8 * 2 * 16 * 512 * 512 * 4 // os.sysconf("SC_PAGE_SIZE")  # pages written by eight passes
    assert default > 0.5 * activations, "by default every pass maps its 16 MiB activations and faults them in"
    # retained: later passes reuse earlier pages (a rare heap growth may still fault one buffer in)
    assert retained < 0.15 * default


def test_retention_can_be_turned_off() -> None:
    env = dict(os.environ, VISION_RETAIN_FREED_MEMORY="0")
    code = "from vision.engine.host_memory import retain_freed_memory; print(retain_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"
