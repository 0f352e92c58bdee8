"""Triton: model repositories (repo.py), the python-backend model (model.py), the deployment (deployment.py:
supervisor + gateway in front of tritonserver), the client; registered as a backend."""
from splitpack.serving.backend import Backend, CapacityWriter, register
from splitpack.serving.triton import command, deploy

BACKEND = register(Backend(
    name="triton", title="Triton", help="Triton (from the nvidia-pytriton wheel) serving a model repository",
    add_arguments=command.add_arguments, server=command.server, start=command.start,
    capacity=CapacityWriter(
        flag="DIR", help="write a Triton model directory for the recommendation",
        plan_key="triton_model_dir", directory=True,
        target=lambda plan, dest: dest / deploy.triton_model_name(plan),
        write_into=deploy.write_triton_into),
))
