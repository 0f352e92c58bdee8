"""Every `splitpack` command documented in README.md, docs/*.md, RESULTS.md and BENCHMARKS.md, run as written.

The commands are read from the fenced code blocks of those files (a line starting with ``splitpack`` or
``$ splitpack``, ``\\`` continuations joined, ``# comments`` dropped), so an edited or new example changes what
runs here, and :func:`test_every_documented_command_has_a_plan` fails until it is told how to run a new one.
Synopses (placeholders: ``[--flag]``, ``...``, ``a|b``, CAPITALS such as ``NAME``) show usage and are not run.

Each example runs in its own temporary folder (relative paths such as ``--out model_store`` land there), through
``splitpack.cli.main`` as the console script calls it, and must exit 0 and write what it names. How each runs:

* as written;
* smaller, where the documented size is too heavy for CI (its test id says ``[smaller: ...]`` and what changed);
* skipped: it needs a GPU (``--device cuda``);
* covered by a server test: the servers' start / status / stop / client examples (:data:`COVERED_BY`).

The heavier ones are marked slow.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from splitpack import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")), "RESULTS.md", "BENCHMARKS.md"]
PLACEHOLDER = re.compile(r"\[|\.\.\.|\w\|\w|\s\|\s|(?<![\w./-])[A-Z][A-Z_]*(?![\w./-])")
GENERATED_IMAGES = "generated_images"  # what the evaluate example reads instead of ../shared/imagenet-sample

# Too heavy for CI as written (minutes of CPU at 600-1024 pixels): the same command at a smaller size (or on a
# smaller model of the same family), as small as still plans the same kinds of candidates (resnet50: staged exact
# plans; b7: a 2x2 grid at every named layer in both modes) and writes the same files.
SMALLER = {
    # the GPU pod's batch search and both KServe flavours on the same family's smallest member: B7's planning at 96
    # pixels and torch-model-archiver compressing its 264 MB of weights took 31 s (capacity.md runs B7 itself)
    "--model efficientnet_b7 --size 600 --gpu-memory 24GiB --search-batch":
        "--model efficientnet_b0 --size 96 --gpu-memory 24GiB --search-batch",
    "--size 1024": "--size 128",
    "--size 600": "--size 96",
    "--data ../shared/imagenet-sample": f"--data {GENERATED_IMAGES}",  # two images made here, not a data set
    # one seed grid and one resize scale: the whole default strategy set runs in tests/test_evaluate.py
    "--size 1x --size 2x": "--size 1x --limit 2 --batch-size 2 --threads 1 --grids 2 --scales 0.5",
}
FAST = {  # seconds on 2 cores: the rest are marked slow
    "splitpack devices",
    "splitpack profile --model resnet18 --size 224 --merge-layers maxpool layer1 layer2 --json --png "
    "docs/img/profile_resnet18_224.png",
    "splitpack triton-repo --model tv:resnet18 --weights resnet18.pt --merge-layer layer1 --out triton_repo",
}
AS_WRITTEN_SLOW = {  # run as written, tens of seconds each (pretrained weights, the real archiver, a check run)
    "splitpack archive --model tf_efficientnet_lite0 --pretrained --merge-layer blocks.2 --grid 2x2 --mode exact "
    "--batch-size 4 --replicas 2 --out model_store",
    "splitpack archive --model tf_efficientnet_lite0 --pretrained --merge-layer blocks.2 --grid 2x2 --mode exact",
    "splitpack triton-repo --model tf_efficientnet_lite0 --pretrained --merge-layer blocks.2 --grid 2x2 --mode exact "
    "--replicas 2 --out triton_repo",
    # a user's own model: the files they presuppose are made by _prepare (a training checkpoint, labels, a module)
    "splitpack archive --model resnet50 --num-classes 3 --weights output/train/model_best.pth.tar --labels "
    "index_to_name.json --merge-layer layer2 --grid 2x2 --out model_store",
    "splitpack triton-repo --model resnet50 --num-classes 3 --weights output/train/model_best.pth.tar --labels "
    "labels.txt --merge-layer layer2 --grid 2x2 --out triton_repo",
    "splitpack archive --model-file my_model.py --model-class MyNet --model-kwargs '{\"width\": 32}' --weights "
    "my_net.pt --labels labels.txt --merge-layer auto --out model_store",
}
# what the own-model examples presuppose: the user's module (a small CNN of 3 classes)
MY_MODEL = """
from torch import nn


class MyNet(nn.Module):
    def __init__(self, width=16, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
"""
SERVERS = "tests/test_torchserve.py (TorchServe.start/stop, what `serve torchserve start|stop` runs; " \
          "`serve torchserve start` itself in test_unknown_merge_layer_fails_to_load_and_names_valid_layers)"
COVERED_BY = {  # server start / status / stop / client examples: the real servers' slow tests run them
    "splitpack serve torchserve start": SERVERS,
    "splitpack serve torchserve stop": SERVERS,
    "splitpack serve torchserve start --threads 2":
        "tests/test_torchserve_faults.py::test_each_worker_runs_its_share_of_the_cores (threads per worker)",
    "splitpack serve torchserve status --probe":
        "tests/test_torchserve_faults.py::test_probe_runs_a_real_inference",
    "splitpack serve torchserve status --probe --run-dir .run/torchserve":
        "tests/test_torchserve_faults.py::test_probe_runs_a_real_inference",
    "splitpack serve triton start --threads 2":
        "tests/test_triton_faults.py::test_serves_with_one_thread_per_instance_by_default",
    "splitpack serve triton start --repo triton_repo":
        "tests/test_triton.py::test_cli_start_stop_and_client (scripts/triton.sh start|stop)",
    "splitpack serve triton stop": "tests/test_triton.py::test_cli_start_stop_and_client",
    "splitpack client triton splitpack/assets/chelsea.jpg --url 127.0.0.1:8001 --model tf_efficientnet_lite0":
        "tests/test_triton.py::test_cli_start_stop_and_client (scripts/triton_client.py)",
    "splitpack serve triton status --probe": "tests/test_triton_faults.py::test_probe_runs_a_real_inference",
    "splitpack serve triton status --probe --run-dir .run": "tests/test_triton_faults.py::test_probe_runs_a_real_inference",
}


def _needs_gpu(command: str) -> bool:
    return "--device cuda" in command


def documented_commands(text: str) -> list[str]:
    """The ``splitpack ...`` command lines of the fenced code blocks of a markdown text."""
    commands, fenced, pending = [], False, None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, None
            continue
        if not fenced:
            continue
        code = re.sub(r"(^|\s)#.*$", "", line).strip()
        if pending is not None:
            pending += " " + code
        elif re.match(r"(\$ )?splitpack [a-z]", code):
            pending = code.removeprefix("$ ")
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            commands.append(pending)
            pending = None
    return commands


@dataclass(frozen=True)
class Example:
    sources: tuple[str, ...]  # the files that document it
    command: str              # as written

    @property
    def runnable(self) -> bool:
        return not PLACEHOLDER.search(self.command)

    @property
    def run(self) -> str:
        """The command this test runs: as written, or smaller (see SMALLER)."""
        command = self.command
        for written, smaller in SMALLER.items():
            command = command.replace(written, smaller)
        return command

    @property
    def id(self) -> str:
        changed = [f"{w} -> {s}" for w, s in SMALLER.items() if w in self.command and not _needs_gpu(self.command)]
        return f"{', '.join(self.sources)}: {self.command}" + (f" [smaller: {'; '.join(changed)}]" if changed else "")


def examples() -> list[Example]:
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for command in documented_commands((ROOT / doc).read_text()):
            found.setdefault(command, []).append(doc)
    return [Example(tuple(dict.fromkeys(sources)), command) for command, sources in found.items()]


def _param(example: Example):
    marks = []
    if _needs_gpu(example.command):
        marks.append(pytest.mark.skip(reason="needs a GPU (--device cuda)"))
    elif example.command not in FAST:
        marks.append(pytest.mark.slow)
    return pytest.param(example, id=example.id, marks=marks)


RUN = [e for e in examples() if e.runnable and e.command not in COVERED_BY]


def test_the_docs_have_runnable_examples_of_every_command_they_show():
    runnable = {e.command.split()[1] for e in examples() if e.runnable}
    assert {"archive", "triton-repo", "serve", "client", "devices", "profile", "capacity", "export", "bench",
            "evaluate"} <= runnable


def test_every_documented_command_has_a_plan():
    """A new example is run as written unless it is heavy: say so here (FAST or SMALLER), or name the test
    that covers it (COVERED_BY)."""
    runnable = [e.command for e in examples() if e.runnable]
    unplanned = [c for c in runnable if c not in COVERED_BY and c not in FAST and c == Example((), c).run
                 and not _needs_gpu(c) and c not in AS_WRITTEN_SLOW]
    assert not unplanned, "documented commands with no plan in tests/test_docs_examples.py:\n" + "\n".join(unplanned)
    stale = set(COVERED_BY) - set(runnable)
    assert not stale, f"COVERED_BY names commands the docs no longer show: {stale}"
    for covering in set(COVERED_BY.values()):  # the covering tests exist
        path, _, name = covering.split(" ")[0].partition("::")
        assert (ROOT / path).is_file() and (not name or f"def {name}(" in (ROOT / path).read_text()), covering


def _prepare(folder: Path, command: str) -> None:
    """The files an example presupposes: weights, labels, a model file, images for evaluate."""
    labels = ["alpha", "beta", "gamma"]
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "index_to_name.json").write_text(json.dumps(dict(enumerate(labels))))
    if "output/train/model_best.pth.tar" in command:  # a timm training checkpoint
        import timm

        (folder / "output" / "train").mkdir(parents=True)
        torch.save({"epoch": 1, "state_dict": timm.create_model("resnet50", num_classes=3).state_dict()},
                   folder / "output" / "train" / "model_best.pth.tar")
    if "--model-file my_model.py" in command:
        (folder / "my_model.py").write_text(MY_MODEL)
        namespace: dict = {}
        exec(MY_MODEL, namespace)
        torch.save(namespace["MyNet"](width=32).state_dict(), folder / "my_net.pt")
    if "--weights resnet50.pth" in command:  # a fine-tuned ImageNet ResNet-50's plain state dict
        import timm

        torch.save(timm.create_model("resnet50").state_dict(), folder / "resnet50.pth")
    if "--weights resnet18.pt" in command:
        import torchvision

        torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pt")
    if f"--data {GENERATED_IMAGES}" in command:
        import numpy as np
        from PIL import Image

        images = folder / GENERATED_IMAGES
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / "labels.tsv").write_text("file\tclass_index\n0.png\t1\n1.png\t2\n")


def _written_paths(argv: list[str]) -> list[str]:
    """The files or folders an example says it writes (--out, --png, --write-*, a shell redirect)."""
    flags = {"--out", "--png", "--write-triton", "--write-torchserve", "--write-kserve"}
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags]


@pytest.mark.parametrize("example", [_param(e) for e in RUN])
def test_documented_example_runs(example: Example, tmp_path, monkeypatch):
    command, _, redirect = example.run.partition(" > ")
    argv = shlex.split(command)[1:]
    monkeypatch.chdir(tmp_path)
    _prepare(tmp_path, example.run)
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = cli.main(argv)
    finally:
        torch.set_num_threads(threads)  # evaluate --threads 1 must not slow the tests that follow
    assert code == 0, f"exit {code}: {example.run}"
    if redirect:
        (tmp_path / redirect.strip()).write_text(stdout.getvalue())
    if "--json" in argv:
        json.loads(stdout.getvalue())  # the JSON it promises on stdout
    for path in _written_paths(argv) + ([redirect.strip()] if redirect else []):
        assert (tmp_path / path).exists(), f"{example.run} did not write {path}"


def test_docs_name_features_not_issue_numbers():
    """A reader has no issue tracker: docs, scripts and the Makefile say which feature, not which issue."""
    files = [ROOT / d for d in DOCS] + sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "Makefile"]
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in files
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"\bissues? ?#?\d+\b", line, re.I)]
    assert not found, "\n".join(found)
