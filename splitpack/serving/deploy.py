"""A capacity plan's recommendation as serving settings: what every backend's capacity writer deploys.

The plan (:func:`splitpack.capacity.planner.plan_capacity`) decides the merge layer, grid, mode,
replicas and batch size; every other serving parameter (schema: :mod:`splitpack.serving.config`)
comes from ``settings``. Each backend writes its own config from these
(``Backend.capacity``, e.g. :mod:`splitpack.serving.triton.deploy`).
"""
from __future__ import annotations

from typing import Any, Mapping

from splitpack.serving.config import DEPLOY, MODEL, BY_NAME, ServingConfig

# what a plan decides; the CLI offers the schema's other flags for the written configs
PLANNED = ("model_name", "merge_layer", "grid", "mode", "replicas", "batch_size")


def planned_settings(plan: dict, settings: Mapping[str, Any] | None, server: str) -> tuple[ServingConfig, dict[str, Any]]:
    """(serving config, ``server``'s deploy values) of the plan's recommendation; ``settings`` fill the
    schema's other parameters (those of another server are left out)."""
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    decided = sorted(set(settings) & set(PLANNED))
    if decided:
        raise ValueError(f"{', '.join(decided)}: set by the plan, not by the written config")
    rec = plan["recommended"]
    own_class = settings.get("model_class") is not None  # else the plan's model is a timm/torchvision name
    model = {k: v for k, v in settings.items() if BY_NAME[k].section == MODEL}
    config = ServingConfig.from_mapping(model | {
        "model_name": None if own_class else plan["model"], "merge_layer": rec["merge_layer"],
        "grid": rec["grid"] or "2x2", "mode": rec["mode"] or "exact",
        "data_config": planned_data_config(plan, model.get("data_config"))})
    deploy = {k: v for k, v in settings.items() if BY_NAME[k].section == DEPLOY and server in BY_NAME[k].servers}
    deploy |= {"replicas": max(1, rec["replicas"]), "batch_size": rec.get("batch_size") or plan["batch_size"]}
    if "response_timeout_s" in plan and server in BY_NAME["response_timeout_s"].servers:
        # the plan's: long enough for one batch of its shape (splitpack.capacity.timeout); a given one wins
        deploy.setdefault("response_timeout_s", plan["response_timeout_s"])
    return config, deploy


def planned_data_config(plan: dict, given: Any) -> dict | None:
    """The written data config serves at the planned input size (``--size``): the memory was planned for it."""
    from splitpack.serving.config import data_config

    given = data_config(given) or {}
    if "size" not in plan:
        return given or None
    planned = (3, int(plan["size"]), int(plan["size"]))
    if "input_size" in given and tuple(given["input_size"]) != planned:
        raise ValueError(f"data_config input_size {list(given['input_size'])}: the plan is for "
                         f"{plan['size']}x{plan['size']} images (--size)")
    return given | {"input_size": planned}
