"""A memory cgroup (v1) set to a limit: the mechanism behind a Kubernetes pod's memory limit.

Created under this process's own memory cgroup (``/proc/self/cgroup``), so it works
wherever this process may manage its own cgroup (root, or a delegated hierarchy).
What the kernel reports is what the limit charged: ``memory.max_usage_in_bytes``
(the peak), the ``oom_kill`` counter of ``memory.oom_control`` and ``memory.failcnt``.
When the OOM killer takes a server's parent (TorchServe's frontend), its workers are
left orphaned inside the cgroup: :meth:`MemoryCgroup.remove` ends every process still
in ``cgroup.procs`` before removing the directory.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here (no v1 memory controller, or no permission)."""


def own_memory_cgroup(proc_cgroup: str | None = None) -> Path:
    """The v1 memory cgroup directory this process belongs to."""
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_ROOT / path.lstrip("/")
    raise CgroupUnavailable("no v1 memory controller in /proc/self/cgroup (cgroup v2 only, or none)")


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


class MemoryCgroup:
    """``with MemoryCgroup(limit) as cg:`` start processes with ``preexec_fn=cg.join``; read ``cg.stats()``."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        self.limit_bytes = int(limit_bytes)
        parent = own_memory_cgroup()
        self.path = parent / (name or f"splitpack-capacity-{os.getpid()}-{time.monotonic_ns()}")
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        except OSError as e:
            if self.path.is_dir():
                self.path.rmdir()
            raise CgroupUnavailable(f"cannot create a memory cgroup under {parent}: {e.strerror or e} "
                                    "(needs root or a delegated cgroup v1 memory hierarchy)") from None
        # no swap to hide behind: the limit binds on memory+swap when the kernel accounts swap
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            try:
                memsw.write_text(str(self.limit_bytes))
            except OSError:
                pass

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def join(self, pid: int | None = None) -> None:
        """Move ``pid`` (default: the calling process, as a ``preexec_fn``) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(pid or os.getpid()))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def stats(self) -> dict[str, int]:
        return {"limit_bytes": _read_int(self.path / "memory.limit_in_bytes"),
                "usage_bytes": _read_int(self.path / "memory.usage_in_bytes"),
                "max_usage_bytes": _read_int(self.path / "memory.max_usage_in_bytes"),
                "failcnt": _read_int(self.path / "memory.failcnt"), "oom_kills": self.oom_kills()}

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def kill_all(self, timeout_s: float = 30.0) -> None:
        """SIGKILL every process still inside, until none is left."""
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def remove(self) -> None:
        if not self.path.is_dir():
            return
        self.kill_all()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
