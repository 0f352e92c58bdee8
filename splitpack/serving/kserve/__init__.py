"""KServe: InferenceService manifests and stock-runtime storage written from a capacity plan; registered as a
backend that only writes configs (``splitpack capacity --write-kserve DIR``; the pods run elsewhere).

plan.py (what one pod runs, from the capacity report), manifests.py (InferenceService, TorchServe's
config.properties), validate.py (the vendored CRD's schema and KServe's own rules), storage.py (the
TorchScript program in a .mar with stock_handler.py, and Triton's libtorch directory), command.py (the flags).
"""
from pathlib import Path

from splitpack.serving.backend import Backend, CapacityWriter, register
from splitpack.serving.kserve import command

BACKEND = register(Backend(
    name="kserve", title="KServe", help="KServe InferenceServices on the stock TorchServe and Triton runtimes",
    add_arguments=None, server=None, start=None,
    capacity=CapacityWriter(
        flag="DIR", help="write KServe InferenceServices and their storage for the stock TorchServe and Triton "
                         "runtimes: DIR/torchserve, DIR/triton (docs/kserve.md)",
        plan_key="kserve_dir", directory=True, target=lambda plan, dest: Path(dest),
        write_into=command.write_into, add_arguments=command.add_arguments, options=command.OPTIONS),
))
