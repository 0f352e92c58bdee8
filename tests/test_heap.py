"""The C heap's mode for timings (splitpack.measure.heap): kept, a large block is reused without page faults;
with glibc's default thresholds it is mapped afresh, a fault per page, every time (the unsplit model's
activations paid that on every call and made split plans look faster than they are)."""
import platform
import resource

import pytest

from splitpack.experiments.bench import in_fresh_processes
from splitpack.measure.heap import HEAP_MODES, faults_per_allocation, set_heap

BLOCK = 64 << 20  # above glibc's largest adaptive mmap threshold (32 MiB): by default mapped on every allocation
PAGES = BLOCK // resource.getpagesize()

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's mallopt")


@needs_glibc
def test_a_kept_heap_reuses_a_large_block_without_page_faults():
    # each mode in a fresh process, as the benchmarks run their cases: mallopt changes a process for good
    default, kept = (next(in_fresh_processes(faults_per_allocation, [BLOCK], heap=mode)) for mode in HEAP_MODES[::-1])
    assert default > 0.9 * PAGES, f"glibc's default mapped the block {default:.0f} pages per call, not afresh"
    assert kept < 0.01 * PAGES, f"a kept heap still faulted {kept:.0f} of {PAGES} pages per call"


def test_a_wrong_heap_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="kept.*default"):
        set_heap("off")
