"""Retained host memory: freed activations stay in malloc's heap and serve the next forward pass.

The check reads glibc's own bookkeeping (``mallinfo2``) rather than counting page faults: with
transparent huge pages set to ``always`` the kernel faults a fresh mapping in 2 MiB at a time, so a
fault count says little about whether memory went back to the kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import PROJECT_ROOT

# A fresh interpreter per case: the malloc settings are process-wide and cannot be undone.
# Each activation is 36 MiB, above glibc's largest dynamic mmap threshold (32 MiB), so by default
# it is always a fresh mapping that ``free`` unmaps, whatever the process allocated before.
PROGRAM = """
import ctypes, sys
import torch
from vision.runtime.host_memory import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print("unsupported"); sys.exit()
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory() if sys.argv[1] == "1" else False
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()).eval()
mapped_while_alive = []
net[2].register_forward_hook(lambda *_: mapped_while_alive.append(libc.mallinfo2().hblkhd))
side = int(sys.argv[2])
x = torch.rand(1, 3, side, side)
with torch.inference_mode():
    for _ in range(2):  # the first passes lay out the heap either way
        net(x)
    start = libc.mallinfo2()
    mapped_while_alive.clear()
    for _ in range(int(sys.argv[3])):
        net(x)
end = libc.mallinfo2()
print(applied, max(mapped_while_alive) - start.hblkhd, end.fordblks, end.arena - start.arena)
"""

SIDE = 768
ACTIVATION = 16 * SIDE * SIDE * 4  # bytes of one float32 activation of the program's net
PASSES = 12  # measured passes, after two that lay out the heap


def _mallinfo(retain: bool) -> tuple[bool, int, int, int]:
    """(applied, most bytes mapped while two activations are alive, bytes kept free after the passes, heap growth)."""
    # glibc's own defaults: no malloc tunables inherited from the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["VISION_RETAIN_FREED_MEMORY"] = "1"
    out = subprocess.run([sys.executable, "-c", PROGRAM, "1" if retain else "0", str(SIDE), str(PASSES)],
                         capture_output=True, text=True,
                         env=env, check=True, cwd=PROJECT_ROOT)
    if out.stdout.strip() == "unsupported":
        pytest.skip("no mallinfo2 (glibc older than 2.33)")
    applied, mapped, kept, growth = out.stdout.split()
    return applied == "True", int(mapped), int(kept), int(growth)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_activations_stay_in_the_heap_and_serve_the_next_pass() -> None:
    applied, mapped, kept, growth = _mallinfo(retain=True)
    if not applied:
        pytest.skip("not glibc")
    assert mapped == 0, "with retention activations come from the heap, not from mappings of their own"
    assert kept >= 2 * ACTIVATION, "freed activations stay in the heap instead of being trimmed back to the kernel"
    # Once laid out, the heap serves the later passes instead of growing with each of them.  A small block
    # malloc happens to place in a freed activation's hole can still move an activation to the top of
    # the heap now and then: 0 to 3 activations in all, from one run to the next on one host, as much
    # over 48 passes as over 12.  So 4 are allowed; passes that each took fresh memory would grow it by
    # one activation per pass at least.
    assert growth <= 4 * ACTIVATION, (
        f"the heap grew by {growth / ACTIVATION:.1f} activations over {PASSES} passes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_by_default_activations_are_mapped_and_returned() -> None:
    """The reference the retention is measured against: glibc's defaults map and unmap every activation."""
    _, mapped, kept, _ = _mallinfo(retain=False)
    assert mapped >= 2 * ACTIVATION
    assert kept < ACTIVATION


def test_retention_can_be_turned_off() -> None:
    env = dict(os.environ, VISION_RETAIN_FREED_MEMORY="0")
    code = "from vision.runtime.host_memory import retain_freed_memory; print(retain_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=PROJECT_ROOT)
    assert out.stdout.strip() == "False"
