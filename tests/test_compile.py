"""Compiled split-pack (splitpack.core.compile.recording, tape, cudagraphs): the straight-line program recorded from the
interpreter gives its outputs bit for bit at any batch size and keeps its peak memory; torch.compile of it
stays exact; CUDA-graph bookkeeping and fallbacks (the capture itself needs CUDA)."""
from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitpack
from conftest import exactness_bound, randomize_norms, rel_error
from test_engine_property import ChannelsLastNorm  # LayerNorm over channels through a permute: NHWC output
from splitpack.core.compile.recording import MODES, compile_mode, record
from splitpack.core.compile.cudagraphs import GraphedPlans, batch_buckets, bucket_for, pad_batch, unpad
from splitpack.core.compile.tape import NotRecordable, record_batch_free
from splitpack.measure.allocations import peak_allocated_bytes
from splitpack.measure.meter import peak_activation_bytes

CASES = [
    # model, plan, grids, input size: a plain CNN staged to its pooling, SE gates (three passes) and channel splits
    ("resnet18", "layer1,layer3,global_pool", "3x2,2x2,2x1", (97, 113)),
    ("test_efficientnet", "blocks.1,blocks.3,global_pool", "3x3,2x2,2x2", (96, 96)),
    ("cspresnet50", "stages.1,head.global_pool", "2x2,2x1", (96, 96)),
]


@pytest.mark.parametrize("name,merge,grid,size", CASES, ids=[c[0] for c in CASES])
def test_program_gives_the_interpreters_outputs_bit_for_bit_at_any_batch(models, name, merge, grid, size):
    model = models(name)
    interpreted = splitpack.wrap(model, merge, grid)
    compiled = splitpack.wrap(model, merge, grid, compile="program")
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        for batch in (3, 1, 2):
            assert torch.equal(compiled(x[:batch]), interpreted(x[:batch])), batch
        assert rel_error(compiled(x), model(x)) <= 1e-5
    (plan,) = compiled.compiled.report()  # one program for every batch size of this input size
    assert plan["size"] == [3, *size] and plan["mode"] == "program" and plan["ops"] > 100


def test_program_keeps_the_interpreters_peak_memory(models):
    """Same order, values freed at their last use: the peak is at most the interpreter's (+2%). It can be
    lower: the program frees a value right after the op that reads it last, the interpreter once the step
    that read it is done."""
    model = models("test_efficientnet")
    x = torch.randn(1, 3, 160, 160)
    plan = ("blocks.1,blocks.3,global_pool", "4x4,2x2,2x2")
    interpreted = splitpack.wrap(model, *plan)
    compiled = splitpack.wrap(model, *plan, compile="program")
    with torch.no_grad():
        compiled(x)  # recorded here, outside the measurement
    program_peak, reference = peak_activation_bytes(compiled, x), peak_activation_bytes(interpreted, x)
    assert 0.8 * reference <= program_peak <= 1.02 * reference
    assert program_peak < 0.5 * peak_activation_bytes(model, x)  # still split
    by_allocator = peak_allocated_bytes(interpreted, x)
    assert by_allocator >= reference  # the allocator also sees buffers inside kernels
    assert 0.8 * by_allocator <= peak_allocated_bytes(compiled, x) <= 1.02 * by_allocator


def test_allocator_meter_sees_what_the_tracker_sees(models):
    """The CPU allocator's events (what measures torch.compile's code, which the tracker cannot see) agree
    with the op tracker on an eager model: at least its bytes, plus kernel temporaries."""
    model, x = models("resnet18"), torch.randn(1, 3, 96, 96)
    tracked, allocated = peak_activation_bytes(model, x), peak_allocated_bytes(model, x)
    assert 0 < tracked <= allocated <= 2 * tracked


def test_programs_are_per_size_dtype_and_layout_and_share_the_parameters(models):
    model = models("resnet18")
    wrapped = splitpack.wrap(model, "layer2,global_pool", "2x2,1x1", compile="program")
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        wrapped(x)
        wrapped(torch.randn(1, 3, 96, 80))
        wrapped(torch.randn(1, 3, 64, 64))
        out = wrapped(x.to(memory_format=torch.channels_last))
        assert rel_error(out, model(x)) <= 1e-5
    sizes = [(r["size"], r["channels_last"]) for r in wrapped.compiled.report()]
    assert sizes == [([3, 96, 80], False), ([3, 64, 64], False), ([3, 96, 80], True)]
    graph = wrapped.compiled.plan(x).graph
    weights = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    constants = [*graph.parameters(), *graph.buffers()]
    assert constants and all(t.data_ptr() in weights for t in constants), "the program holds copies of weights"


def test_half_precision_program(models):
    model = models("test_efficientnet")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    try:
        with torch.no_grad():
            ref64 = model.double()(x)
            model.to(torch.bfloat16)
            ref = model(x.bfloat16())
            wrapped = splitpack.wrap(model, "blocks.2,global_pool", "2x2,2x2", compile="program")
            out = wrapped(x.bfloat16())
    finally:
        model.float()
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) <= exactness_bound(ref, ref64)


def test_a_run_that_reads_tensor_values_cannot_be_recorded():
    """(The engine's shape propagation refuses such models before; the tape refuses them on its own too.)"""
    def branch_on_value(x):
        return x * 2 if x.mean().item() > 0 else x

    with pytest.raises(NotRecordable, match="reads tensor values in Python.*compile=False"):
        record_batch_free(branch_on_value, torch.zeros(1, 3))
    assert isinstance(NotRecordable("x"), splitpack.SplitError)


def test_sizes_not_proportional_to_the_batch_are_refused():
    def squares(x):
        return x.new_zeros(x.shape[0] ** 2 + 1)

    with pytest.raises(NotRecordable, match="1 at batch 1 and 2 at batch 2|2 at batch 1 and 5 at batch 2"):
        record_batch_free(squares, torch.zeros(1, 3))
    doubled = record_batch_free(lambda x: x.new_zeros(x.shape[0] * 3, 2) + x.sum(), torch.zeros(4, 3))
    assert doubled(torch.ones(5, 3)).shape == (15, 2)


def test_a_channels_last_checkpoint_in_row_bands_records_at_any_batch():
    # A band of an NHWC checkpoint is channels-last-contiguous at batch 1 (the batch stride does not
    # count) but not at batch 2; the band storage must pick the same memory format at both, or the
    # batch-1 and batch-2 recordings differ and the program cannot be made batch-free.
    torch.manual_seed(0)
    blocks = nn.Sequential(nn.Conv2d(3, 4, 1), ChannelsLastNorm(4))
    model = nn.Sequential(OrderedDict(blocks=blocks, pool=nn.AdaptiveAvgPool2d(1))).double().eval()
    # "blocks" and "blocks.1" are the same value: the last stage writes views of the previous band
    split = splitpack.wrap(model, ["blocks.0", "blocks", "blocks.1"], [(1, 1), (1, 1), (2, 1)],
                           mode="exact", compile="program")
    for batch in (2, 1):
        x = torch.randn(batch, 3, 17, 17, dtype=torch.float64)
        with torch.no_grad():
            assert rel_error(split(x), model(x)) <= 1e-12


def test_compile_option_values():
    assert compile_mode(False) == compile_mode(None) == compile_mode("off") == "off"
    assert compile_mode(True) == compile_mode("true") == compile_mode("inductor") == "inductor"
    assert compile_mode("program") == "program" and MODES == ("off", "program", "inductor")
    model = splitpack.create_model("resnet18")
    with pytest.raises(ValueError, match="compile: expected one of off, program, inductor"):
        splitpack.wrap(model, "layer1", compile="fast")
    with pytest.raises(ValueError, match="need mode='exact'"):
        splitpack.wrap(model, "layer1", mode="seed", compile="program")
    with pytest.raises(ValueError, match="seed mode is interpreted"):
        record(splitpack.wrap(model, "layer1", mode="seed"), torch.zeros(1, 3, 32, 32))
    assert splitpack.wrap(model, "layer1").compiled is None  # the interpreter, as before


def test_profiling_hook_runs_the_interpreter(models):
    """on_layer needs the per-op interpreter: a compiled module falls back to it while the hook is set."""
    wrapped = splitpack.wrap(models("resnet18"), "layer2", 2, compile="program")
    seen = []
    wrapped.on_layer = seen.append
    with torch.no_grad():
        wrapped(torch.randn(1, 3, 64, 64))
    assert "layer2" in seen and wrapped.compiled.report() == []


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


def test_inductor_compiles_the_program_and_stays_exact():
    """torch.compile (inductor, C++ kernels) of the recorded program on this CPU; fused kernels round
    differently, so the exactness bound applies, not bit equality."""
    torch.manual_seed(0)
    model = randomize_norms(_Small())
    wrapped = splitpack.wrap(model, "body,pool", "2x2,2x1", compile=True)
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        ref64 = model.double()(x.double())
        model.float()
        ref = model(x)
        out = wrapped(x)
    assert rel_error(out, ref) <= exactness_bound(ref, ref64)
    (plan,) = wrapped.compiled.report()
    assert plan["mode"] == "inductor" and plan["first_call_s"][2] > 0  # compiled on the first call


# ------------------------------------------------------------------ CUDA graphs: the CPU-runnable parts

def test_batch_buckets():
    assert batch_buckets(1) == (1,) and batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6)
    assert [bucket_for(b, (1, 2, 4, 8)) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_cuda_graph_buckets_go_up_to_the_largest_batch_served(models):
    """max_batch (a server's batch size) sets the buckets, for a named plan and for each size merge_layer auto plans."""
    model = models("resnet18")
    assert splitpack.wrap(model, "layer1", cuda_graphs=True).compiled.buckets == (1, 2, 4, 8)  # no batch size known
    assert splitpack.wrap(model, "layer1", cuda_graphs=True, max_batch=16).compiled.buckets == (1, 2, 4, 8, 16)
    auto = splitpack.wrap(model, "auto", cuda_graphs=True, max_batch=6)
    assert auto.for_input((1, 3, 64, 64)).compiled.buckets == (1, 2, 4, 6)


def test_padding_to_a_bucket_and_back():
    x = torch.randn(3, 2, 4, 4)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2, 4, 4) and torch.equal(padded[:3], x) and not padded[3].any()
    assert pad_batch(x, 3) is x
    static = (torch.arange(8.0).view(4, 2), [torch.zeros(4, 1)])
    logits, (rest,) = unpad(static, 3)
    assert torch.equal(logits, static[0][:3]) and rest.shape == (3, 1)
    assert logits.data_ptr() != static[0].data_ptr()  # copied out: the next replay overwrites the graph's output


def test_cuda_graphs_fall_back_on_the_cpu_and_say_why_once(models, caplog):
    model = models("resnet18")
    wrapped = splitpack.wrap(model, "layer2", 2, cuda_graphs=True)
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="splitpack.core.compile.cudagraphs"), torch.no_grad():
        out = wrapped(x)
        wrapped(x)
    assert rel_error(out, model(x)) <= 1e-5  # the recorded program ran instead
    assert [r.getMessage() for r in caplog.records] == ["cuda_graphs: inputs on cpu run without CUDA graphs"]
    assert wrapped.compiled.graphs == {} and wrapped.compiled.warm_up(x) == []


def test_cuda_graph_bookkeeping_per_size_and_bucket(models):
    """Which graphs exist and which one a batch replays; the capture is CUDA's, replaced here by a
    stand-in that calls the program (the only part this CPU cannot run)."""
    captured = []

    def stand_in(program, example, pool):
        captured.append(tuple(example.shape))
        return lambda x: program(x)

    wrapped = splitpack.wrap(models("resnet18"), "layer2", 2, cuda_graphs=True)
    graphed: GraphedPlans = wrapped.compiled
    graphed.capture_fn = stand_in
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        for batch in (3, 4, 1, 5, 2):
            out = graphed.replay(x[:batch])
            assert out.shape == (batch, 1000) and rel_error(out, models("resnet18")(x[:batch])) <= 1e-5
    assert captured == [(4, 3, 64, 64), (1, 3, 64, 64), (8, 3, 64, 64), (2, 3, 64, 64)]
    assert sorted(bucket for _, bucket in graphed.graphs) == [1, 2, 4, 8]
    assert graphed.fallback_reason(torch.zeros(9, 3, 64, 64)) == \
        "cuda_graphs: batches above 8 run without CUDA graphs (batch buckets: 1, 2, 4, 8)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device; none here")
def test_cuda_graphs_replay_equals_the_interpreter(models):
    model = models("resnet18").cuda()
    try:
        wrapped = splitpack.wrap(model, "layer2,global_pool", "2x2,2x2", cuda_graphs=True)
        interpreted = splitpack.wrap(model, "layer2,global_pool", "2x2,2x2")
        x = torch.randn(3, 3, 128, 128, device="cuda")
        with torch.no_grad():
            assert wrapped.compiled.warm_up(x) == [1, 2, 4, 8]
            for batch in (1, 3):
                assert rel_error(wrapped(x[:batch]), interpreted(x[:batch])) <= 1e-5
    finally:
        model.cpu()
