"""Write outputs all or nothing: build in a temporary place next to the target, then rename into place.

A command that fails half way leaves no half-made model directory, archive or
report behind: what it built is removed, and so are the folders it created
for the target.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _missing_parents(path: Path) -> list[Path]:
    """``path``'s ancestors that do not exist yet, deepest first."""
    missing = []
    for parent in path.resolve().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staged_path(target: str | Path, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (a file path, or an empty folder with ``directory``) in ``target``'s folder;
    when the block succeeds it replaces ``target``, when it raises nothing is left behind.

    ``overwrite=False`` refuses an existing ``target`` (FileExistsError) before anything is built.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    created = _missing_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    work = stage if directory else stage / target.name
    try:
        yield work
        if not work.exists():
            raise FileNotFoundError(f"nothing was written for {target}")
        _replace(work, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _replace(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target`` (a file or a folder), replacing what was there."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def write_text(target: str | Path, text: str) -> Path:
    """``target.write_text(text)``, all or nothing."""
    with staged_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)
