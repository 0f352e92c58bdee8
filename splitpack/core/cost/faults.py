"""This process's page faults, without torch (the heap settings and the timings both count them)."""
from __future__ import annotations

import resource


def minor_faults() -> int:
    """This process's minor page faults so far (a fresh page touched counts one): timings count them, since
    glibc's default heap makes a model with large activations fault on every call (splitpack.measure.heap)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
