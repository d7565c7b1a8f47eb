"""The CPU allocator settings (myopia.train.memory): freed memory kept for reuse within a phase, and
handed back between phases. Run in a subprocess: the settings are process-wide."""

import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch
from myopia.train.memory import keep_freed_memory, release_freed_memory

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024  # MiB

assert keep_freed_memory()
base = rss()
x = torch.ones(64 * 2**20)  # 256 MiB, from the heap (no mmap)
del x
kept = rss()
assert release_freed_memory()
print(base, kept, rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_then_released():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    base, kept, released = map(float, out.split())
    assert kept > base + 200  # kept by the heap after free: the next step reuses it without faulting
    assert released < base + 50  # malloc_trim handed it back


def test_release_does_nothing_under_system_malloc():
    code = ("import os; os.environ['MYOPIA_MALLOC'] = 'system'\n"
            "from myopia.train.memory import keep_freed_memory, release_freed_memory\n"
            "print(keep_freed_memory(), release_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
