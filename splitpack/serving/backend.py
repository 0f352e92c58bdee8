"""The server protocol every way of serving implements, and the registry the backends add themselves to.

A backend (TorchServe, Triton, ...) is a package ``splitpack/serving/<name>/`` whose ``__init__``
calls :func:`register` with a :class:`Backend`: its ``splitpack serve <name>`` flags, how to build
its :class:`Server` from them, how to start it, and (optionally) how to write the config that
deploys a capacity plan. Everything generic -- ``splitpack serve <name> start|stop|status [--probe]``,
the ``--write-<name>`` outputs of ``splitpack capacity``, readiness checks, probes -- goes through
these two classes only. :data:`BUILTIN` is the one line a new backend adds
(docs/architecture.md says what it implements).
"""
from __future__ import annotations

import argparse
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Mapping

from splitpack.errors import ServerError
from splitpack.serving.extras import EXTRAS
from splitpack.serving.health import ProbeResult
from splitpack.serving.process import poll, read_pid, tail

# The backends that ship with splitpack: the modules that register them when imported.
BUILTIN = ("splitpack.serving.torchserve", "splitpack.serving.triton", "splitpack.serving.kserve")


class in_run_dir:  # noqa: N801 -- used like @property
    """A file or folder of a server's run folder, declared in one line: ``pid_file = in_run_dir("tmp/x.pid")``
    reads as ``Path(self.run_dir) / "tmp/x.pid"``."""

    def __init__(self, relative: str):
        self.relative = relative

    def __get__(self, server, owner=None):
        return self if server is None else Path(server.run_dir) / self.relative


class Server(ABC):
    """One server controlled from its run folder: the pid file says whether it runs, its log why not.

    A subclass gives its files (:attr:`pid_file`, :attr:`log_file`, :attr:`config_file`),
    :meth:`stop`, :meth:`status`, :meth:`probe` and :meth:`ready_state`; the pid check, log tail,
    readiness wait and the serving check are shared.
    """

    error: ClassVar[type[ServerError]] = ServerError  # what its failures raise
    pid_command: ClassVar[str | None] = None          # what the pid's command line must contain

    @property
    @abstractmethod
    def pid_file(self) -> Path:
        """The file holding the pid :meth:`stop` signals."""

    @property
    @abstractmethod
    def log_file(self) -> Path:
        """The server's own log (start failures are explained from it)."""

    @property
    @abstractmethod
    def config_file(self) -> Path:
        """The config ``start`` wrote and the server runs with."""

    @abstractmethod
    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the server and everything it started; True if one was running."""

    @abstractmethod
    def status(self) -> dict:
        """What runs (JSON-able), for ``splitpack serve NAME status``."""

    @abstractmethod
    def probe(self, models: list[str] | None = None, timeout: float | None = None) -> list[ProbeResult]:
        """One real inference per model (default: every model it serves), see :mod:`splitpack.serving.health`;
        ``timeout``: seconds to wait for each answer (None: what the deployment's config allows)."""

    @abstractmethod
    def ready_state(self) -> dict | None:
        """While starting: the status once every model is ready, None before; raise :attr:`error` with the
        reason as soon as the start failed."""

    def pid(self) -> int | None:
        """The server's pid if it runs, else None."""
        return read_pid(self.pid_file, self.pid_command)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_file, lines)

    def wait_ready(self, timeout: float) -> dict:
        """Poll :meth:`ready_state` until every model is ready; the reason if the start failed or timed out."""
        return poll(self.ready_state, timeout, lambda: self.error(
            f"not ready after {timeout:.0f} s; log {self.log_file}:\n{self.log_tail()}"))

    def check_serving(self, models: list[str], timeout: float | None = None) -> None:
        """Ready models can still fail every request: one real inference per model, or the reason.
        ``timeout``: per answer (None: the deployment's configured one, see :meth:`probe`)."""
        failed = [r for r in self.probe(models, timeout) if not r.ok]
        if failed:
            raise self.error("; ".join(f"model {r.model!r} does not serve: {r.detail}" for r in failed))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class CapacityWriter:
    """How ``splitpack capacity --write-<backend> DEST`` writes the config that deploys a plan."""

    flag: str                                    # the flag's metavar (FILE, DIR)
    help: str                                    # the flag's help text
    plan_key: str                                # where the plan records what was written
    directory: bool                              # the output is a folder (else a file)
    target: Callable[[dict, Path], Path]         # (plan, DEST) -> the path written
    # (plan, staged path, name of the target, settings, pretrained=, weights=, **options): the content, into a
    # staged path
    write_into: Callable[..., None]
    # its own `splitpack capacity` flags (added to a group), whose values write_into gets as keywords
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    options: tuple[str, ...] = ()                # the dest names of those flags


@dataclass(frozen=True)
class Backend:
    """A way of serving, as the CLI and the capacity planner see it: a server splitpack runs
    (``splitpack serve NAME``: ``add_arguments``, ``server``, ``start``), a config it writes for a plan
    (``capacity``: ``splitpack capacity --write-NAME``), or both."""

    name: str                                                  # `splitpack serve NAME`, `--write-NAME`
    title: str                                                 # how messages name it
    help: str                                                  # one line, for `splitpack serve --help`
    # a backend that only writes configs for servers elsewhere (KServe) has no `splitpack serve NAME`: None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # its own `serve NAME` flags
    server: Callable[[argparse.Namespace], Server] | None = None            # the server those flags name
    start: Callable[[Server, argparse.Namespace], list[str]] | None = None  # start it until it serves; lines to print
    capacity: CapacityWriter | None = None
    extra: str | None = None  # what its pip extra (named like the backend) installs, for MissingExtra messages


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (a backend package calls this when imported); the name must be new."""
    known = _REGISTRY.get(backend.name)
    if known is not None and known != backend:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    if backend.extra is not None:
        EXTRAS.setdefault(backend.name, backend.extra)
    return backend


def unregister(name: str) -> None:
    """Remove a backend (a test's fake one, say); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def backends() -> Mapping[str, Backend]:
    """Every registered backend by name (the built-in ones first)."""
    for module in BUILTIN:
        importlib.import_module(module)
    return dict(_REGISTRY)


def get(name: str) -> Backend:
    known = backends()
    if name not in known:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")
    return known[name]

