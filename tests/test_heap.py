"""The C heap's mode (splitpack.measure.heap; the benchmarks' --heap, a served model's ``heap`` parameter): kept,
a large block is reused without page faults; with glibc's default thresholds it is mapped afresh, a fault per
page, every time (the unsplit model's activations paid that on every call and made split plans look faster
than they are)."""
import platform
import resource

import pytest

from splitpack.experiments.bench import in_fresh_processes
from splitpack.measure.heap import faults_per_allocation, set_heap
from splitpack.serving.config import ServingConfig

BLOCK = 64 << 20  # above glibc's largest adaptive mmap threshold (32 MiB): by default mapped on every allocation
PAGES = BLOCK // resource.getpagesize()

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's mallopt")


def test_a_wrong_heap_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="kept.*default"):
        set_heap("off")
    with pytest.raises(ValueError, match="heap.*kept, default"):  # a served model's config, before any worker
        ServingConfig(model_name="resnet18", heap="off")


def a_worker_keeping_its_heap(section: dict) -> tuple[int, dict, int]:
    """In a process started as a server starts a worker: the faults of a large block under glibc's default heap,
    what a replica built from ``section`` (its model config) reports, and the faults of the block after it."""
    from splitpack.serving.replica import Replica

    before = faults_per_allocation(BLOCK)
    replica = Replica(section, "torchserve", replicas=1, weights=lambda artifacts: None, device="cpu",
                      base_dir=None, warn=print)
    return before, replica.describe(), faults_per_allocation(BLOCK)


@needs_glibc
def test_a_kept_heap_reuses_a_large_block_without_page_faults():
    # one fresh process (mallopt changes a process for good), glibc's default heap until the config says kept
    section = {"model_name": "test_efficientnet", "merge_layer": "blocks.1", "heap": "kept",
               "data_config": '{"input_size": [3, 64, 64]}'}
    default, settings, kept = next(in_fresh_processes(a_worker_keeping_its_heap, [section], heap="default"))
    assert default > 0.9 * PAGES, f"glibc's default mapped the block {default:.0f} pages per call, not afresh"
    assert settings["heap"] == "kept" and settings["heap_kept"] is True  # the ready log line's settings
    assert kept < 0.01 * PAGES, f"a kept heap still faulted {kept:.0f} of {PAGES} pages per call"
