"""TorchServe: .mar archives (archive.py), the server (server.py), the handler (handler.py), registered as a backend."""
from pathlib import Path

from splitpack.serving.backend import Backend, CapacityWriter, register
from splitpack.serving.torchserve import command, deploy

BACKEND = register(Backend(
    name="torchserve", title="TorchServe", help="TorchServe serving the .mar archives of a model store",
    add_arguments=command.add_arguments, server=command.server, start=command.start,
    capacity=CapacityWriter(
        flag="FILE", help="write model-config.yaml (or a whole archive if FILE ends in .mar)",
        plan_key="torchserve_config", directory=False, target=lambda plan, dest: Path(dest),
        write_into=lambda plan, path, name, settings, **weights: deploy.write_torchserve_into(
            plan, path, settings, **weights)),
))
