"""engine.allocator: freed tensor memory stays in the process on CPUs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.allocator import keep_freed_memory

# A fresh process runs cycles of step-like work: tensors of a few MiB whose sizes change
# from round to round, freed while small tensors live on. Untuned, glibc keeps mapping
# new sizes afresh and handing the freed top of its heap back, so every cycle faults
# pages in again; tuned, after a few cycles everything comes from pages it kept.
CYCLES = textwrap.dedent("""
    import resource, sys, torch
    from engine.allocator import keep_freed_memory

    if sys.argv[1] == "tuned" and not keep_freed_memory():
        sys.exit(3)

    def cycle():
        for mib in (2, 6, 3, 8, 4, 12):
            large = [torch.empty(mib << 18).fill_(1) for _ in range(3)]
            small = [torch.empty(1000).fill_(1) for _ in range(10)]
            del large

    for _ in range(3):
        cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

REPO = Path(__file__).resolve().parents[2]


def later_cycle_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True,
                          text=True, check=True, cwd=REPO)
    return int(done.stdout)


@pytest.mark.skipif(not keep_freed_memory(), reason="C library without glibc's mallopt")
def test_freed_pages_are_reused_instead_of_faulted_in_again():
    assert later_cycle_faults("untuned") >= 4096  # 16 MiB of pages: the pattern does fault
    assert later_cycle_faults("tuned") < 256
