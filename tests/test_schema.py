"""The one schema of serving parameters (splitpack.serving.config.PARAMS) and everything derived from it:
the CLI flags of archive / triton-repo / capacity --write-*, the TorchServe model-config.yaml, the Triton
config.pbtxt and docs/parameters.md. None of these tests needs a server or a model."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from conftest import load_script
from splitpack.cli import build_parser
from splitpack.cli.params import add_flags, given
from splitpack.serving import config as schema
from splitpack.serving.config import (DEPLOY, MODEL, PARAMS, Param, ServingConfig, config_class, deploy_settings,
                                      integer, params_for)
from splitpack.serving.torchserve.archive import model_config_yaml, read_model_config
from splitpack.serving.triton.repo import TritonModelSpec, config_parameters, parse_model_config, render_config

ROOT = Path(__file__).resolve().parent.parent

# A value other than the default for every parameter (text, as the CLI and config files carry it).
NON_DEFAULT = {
    "model_name": "tv:resnet18", "merge_layer": "layer1,layer2", "grid": "4x4,2x2", "mode": "seed", "compile": "program",
    "cuda_graphs": "true", "topk": "3", "memory_budget": "512MiB", "max_overhead": "1.5", "max_latency": "1.2",
    "measure_latency": "true", "heap": "kept",
    "native_resolution": "true", "max_side": "640", "max_pixels": "1000000", "min_side": "32",
    "max_image_bytes": "1000", "threads": "2",
    "data_config": '{"crop_pct": 1.0, "interpolation": "bilinear"}',
    "replicas": "3", "instance_kind": "gpu", "batch_size": "6", "max_batch_delay_ms": "7", "response_timeout_s": "99",
    "startup_timeout_s": "300",
    "model_file": "net.py", "model_class": "Net", "model_kwargs": '{"width": 4}', "num_classes": "7",
    "labels": "labels.txt",
}
# a model is a name or a file and class, not both: the stored configs below hold the file and class
STORED = {k: v for k, v in NON_DEFAULT.items() if schema.BY_NAME[k].section == MODEL and k != "model_name"}


def test_every_parameter_is_declared_once_with_a_parsing_default_and_help():
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names)
    assert len({p.cli_flag for p in PARAMS}) == len(PARAMS)
    assert set(NON_DEFAULT) == set(names), "give the new parameter a non-default value in NON_DEFAULT"
    for p in PARAMS:
        assert p.help and p.section in (MODEL, DEPLOY) and set(p.servers) <= set(schema.SERVERS)
        for server in p.servers:
            default = p.default_for(server)
            assert default is None or p.read(default) == p.read(p.text(default)), p.name  # defaults survive text
        assert p.read(NON_DEFAULT[p.name]) != p.default, p.name
        if p.section == DEPLOY:
            assert set(p.native) == set(p.servers), f"{p.name}: name each server's own key"


@pytest.mark.parametrize("name, bad, message", [
    ("grid", "0x2", "grid: must be at least 1x1"), ("grid", "two", "grid"), ("merge_layer", "a,,b", "merge_layer"),
    ("merge_layer", "auto,layer1", "auto"), ("merge_layer", "a+,b", "empty module name in the cut 'a\\+'"),
    ("mode", "fast", "mode: expected one of exact, seed"),
    ("topk", "0", "topk: must be >= 1"), ("native_resolution", "maybe", "native_resolution"),
    ("data_config", '{"mean": [1, 2, 3], "foo": 1}', "data_config: unknown key"),
    ("instance_kind", "tpu", "instance_kind"), ("compile", "fast", "compile: expected one of off, program, inductor"),
    ("cuda_graphs", "sometimes", "cuda_graphs: expected a boolean"), ("threads", "0", "threads: must be >= 1"),
    ("threads", "many", "threads: expected an integer"), ("max_image_bytes", "0", "max_image_bytes: must be >= 1"),
    ("max_batch_delay_ms", "-1", "max_batch_delay_ms: must be >= 0"),
    ("memory_budget", "2 parsecs", "memory_budget: not a memory size"), ("memory_budget", "0", "memory_budget"),
    ("max_overhead", "0.9", "max_overhead: must be >= 1"), ("max_overhead", "fast", "max_overhead: expected a MACs"),
    ("max_latency", "0", "max_latency: must be a ratio > 0"), ("max_latency", "fast", "max_latency: expected a latency"),
])
def test_bad_values_name_the_parameter(name, bad, message):
    with pytest.raises(ValueError, match=message):
        schema.BY_NAME[name].read(bad)


def test_merge_layer_and_grid_are_one_plan_written_as_text():
    unsplit = ServingConfig("resnet18", merge_layer="")
    assert unsplit.merge_layer == "none" and unsplit.plan is None
    assert ServingConfig("resnet18", merge_layer=None) == unsplit == ServingConfig("resnet18", merge_layer="None")
    staged = ServingConfig("resnet18", merge_layer=["layer1", "layer2"], grid=[(4, 4), "2"])
    assert (staged.merge_layer, staged.grid, str(staged.plan)) == ("layer1,layer2", "4x4,2x2", "layer1@4x4,layer2@2x2")
    assert ServingConfig("resnet18", merge_layer="layer1,layer2", grid=3).plan.grids == [(3, 3), (3, 3)]
    assert str(ServingConfig("resnet18", merge_layer="AUTO").plan) == "auto"
    auto = ServingConfig.from_mapping({"model_name": "resnet18", "merge_layer": "auto", "memory_budget": "2GiB",
                                       "max_overhead": "1.5x"})
    assert (auto.plan.memory_budget, auto.plan.max_overhead) == (2 * 1024**3, 1.5)
    assert ServingConfig.from_mapping(auto.to_text()) == auto  # config.pbtxt text reads back
    with pytest.raises(ValueError, match="3 grids given for a plan of 2 stage"):
        ServingConfig("resnet18", merge_layer="layer1,layer2", grid="4x4,2x2,1x1")
    cut = ServingConfig.from_mapping({"model_name": "hrnet_w18_small", "merge_layer": "stem, b.0 + b.1",
                                      "grid": "4x4,2x2"})  # a cut: module outputs joined by '+'
    assert (cut.merge_layer, str(cut.plan)) == ("stem,b.0+b.1", "stem@4x4,b.0+b.1@2x2")
    assert cut.plan.stages[1].members == ("b.0", "b.1")
    assert ServingConfig.from_mapping(cut.to_text()) == cut


def _flags(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command, server, planned", [
    ("archive", "torchserve", ()), ("triton-repo", "triton", ()), ("capacity", None, "PLANNED"),
])
def test_cli_flags_come_from_the_schema(command, server, planned):
    from splitpack.serving.deploy import PLANNED

    flags = _flags(command)
    excluded = PLANNED if planned else ()
    for p in params_for(server):
        if p.name in excluded:
            continue
        assert p.cli_flag in flags, f"splitpack {command} has no {p.cli_flag}"
    assert "--export-path" not in flags and "--max-batch-size" not in flags and "--instances" not in flags


def test_torchserve_model_config_holds_every_parameter_where_the_schema_says():
    config = ServingConfig.from_mapping(STORED)
    deploy = deploy_settings("torchserve", {k: v for k, v in NON_DEFAULT.items()
                                            if k in {p.name for p in params_for("torchserve", DEPLOY)}})
    written = yaml.safe_load(yaml.safe_dump(model_config_yaml(config, deploy, "pretrained")))
    assert set(written["handler"]) == set(STORED) | {"weights_source"}
    assert read_model_config(written) == config  # what the handler reads back
    for p in params_for("torchserve", DEPLOY):
        for key in re.findall(r"[A-Za-z]+(?= *(?:,|$| \())", p.native["torchserve"]):
            assert written[key] == deploy[p.name], (p.name, key)


@pytest.mark.parametrize("compile, given, base, expected", [
    ("off", None, None, 120), ("program", None, None, 120), ("inductor", None, None, 900),  # TorchServe's 120 s
    ("inductor", "auto", None, 900), ("inductor", "1800", None, 1800), ("off", "45", None, 45),
    ("inductor", None, {"startupTimeout": 600}, 600),  # re-archived from a model-config.yaml that sets it
    ("inductor", "1800", {"startupTimeout": 600}, 1800),
])
def test_worker_startup_timeout_follows_the_compile_mode_unless_given(compile, given, base, expected):
    """compile: inductor compiles at model load, longer than TorchServe's default wait for a worker."""
    config = ServingConfig("resnet18", merge_layer="layer2", compile=compile)
    values = {} if given is None else {"startup_timeout_s": given}
    deploy = deploy_settings("torchserve", values) if base is None else schema.check_deploy("torchserve", values)
    assert model_config_yaml(config, deploy, "file", base)["startupTimeout"] == expected


def test_triton_config_pbtxt_holds_every_parameter_where_the_schema_says():
    config = ServingConfig.from_mapping(STORED)
    deploy = {k: v for k, v in NON_DEFAULT.items() if k in {p.name for p in params_for("triton", DEPLOY)}}
    spec = TritonModelSpec(config, deploy)
    parsed = parse_model_config(render_config(spec, num_classes=1000, weights="model.pt"))
    params = config_parameters(parsed)
    assert set(params) == set(STORED) | {"weights"}
    assert ServingConfig.from_section(params, "triton") == (config, {"weights": "model.pt"})  # what model.py reads
    native = {"max_batch_size": parsed.max_batch_size, "instance_group.count": parsed.instance_group[0].count,
              "instance_group.kind": parsed.instance_group[0].kind,
              "dynamic_batching.max_queue_delay_microseconds": parsed.dynamic_batching.max_queue_delay_microseconds}
    assert native == {"max_batch_size": 6, "instance_group.count": 3, "instance_group.kind": 1,  # KIND_GPU
                      "dynamic_batching.max_queue_delay_microseconds": 7000}
    assert {p.native["triton"] for p in params_for("triton", DEPLOY)} == set(native)
    # the comment line regenerates the same model
    command = parsed and render_config(spec, 1000, "model.pt").splitlines()[0]
    assert "--merge-layer layer1,layer2 --grid 4x4,2x2 --mode seed" in command and "--replicas 3" in command


def test_a_new_parameter_is_one_schema_entry():
    """What merge_layer auto and compiled split-pack did (memory_budget, compile): add a Param, and the config class, the flags, the stored text
    and the docs table all carry it."""
    level = Param("compile_level", integer(0), 0, "compilation level (0: interpreted)")
    params = PARAMS[:10] + (level,) + PARAMS[10:]
    Config = config_class(tuple(p for p in params if p.section == MODEL))
    config = Config.from_mapping({"model_name": "resnet18", "compile_level": "2"})
    assert config.compile_level == 2 and config.to_text()["compile_level"] == "2"
    assert Config.from_mapping(config.to_text()) == config
    parser = argparse.ArgumentParser()
    add_flags(parser, "triton", params=params)
    assert given(parser.parse_args(["--compile-level", "4"]), MODEL, params=params) == {"compile_level": 4}
    assert "| `compile_level` | `--compile-level` | `0` |" in schema.markdown_table(params)


def test_threads_is_auto_or_a_count():
    """Threads per replica: auto (the server's share of the cores) unless a model sets its own."""
    assert ServingConfig("resnet18").threads == "auto" and ServingConfig("resnet18", threads="").threads == "auto"
    config = ServingConfig.from_mapping({"model_name": "resnet18", "threads": "3"})
    assert config.threads == 3 and ServingConfig.from_mapping(config.to_text()) == config
    parser = argparse.ArgumentParser()
    add_flags(parser, "torchserve")
    assert given(parser.parse_args(["--threads", "2"]), MODEL) == {"threads": 2}


def test_docs_table_is_the_schema():
    module = load_script("parameters_doc")
    text = (ROOT / "docs" / "parameters.md").read_text()
    assert module.render(text) == text, "docs/parameters.md is stale: run scripts/parameters_doc.py"
