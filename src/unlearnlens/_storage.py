"""Every file unlearnlens writes or reads back goes through here.

Writes are atomic: data goes to a temporary file (or folder) beside the destination and is
renamed into place only once complete, so a failed write (disk full, an exception, a kill)
leaves the previous file or folder as it was. Reads turn missing, truncated and corrupt files
into :class:`~unlearnlens.errors.FileFormatError` naming the file, instead of the parser's own
exception. Nothing here unpickles: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from unlearnlens.errors import ConfigError, FileFormatError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_writable",
    "decode_floats",
    "encode_floats",
    "read_json",
    "read_safetensors",
    "read_safetensors_metadata",
    "remove_directory",
    "write_json",
    "write_safetensors",
    "write_text",
]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on a clean exit it replaces ``path``.

    The parent folder is created if missing. On any exception the temporary file is removed
    and ``path`` is left untouched.

    Raises:
        ConfigError: ``path`` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; a file is to be written there")
    check_writable(path.parent, what="folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(
    directory: str | os.PathLike[str], *, keep_others: bool = False
) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``directory``; on a clean exit it becomes it.

    An existing ``directory`` is moved aside first and deleted only after the new folder is in
    place. On any exception (while writing or while swapping) the temporary folder is removed
    and ``directory`` is left as it was, every file included.

    Args:
        directory: The folder to write.
        keep_others: Keep the entries of an existing ``directory`` that the new contents do not
            replace (a user's own files in a report folder). They are moved, not copied, into
            the new folder, and moved back if the swap fails.

    Raises:
        ConfigError: ``directory`` is a file, or cannot be created or written.
    """
    directory = Path(directory).expanduser().absolute()
    check_writable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    in_place = directory.exists() and _holds_cwd(directory)
    where = directory if in_place else directory.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=where))
    try:
        yield tmp
        if in_place:
            _swap_entries(directory, tmp)
        elif directory.exists():
            _swap(directory, tmp, keep_others=keep_others)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _holds_cwd(directory: Path) -> bool:
    """Whether ``directory`` is the working directory or one of its ancestors.

    Such a folder cannot be moved aside: the process would keep working in the moved copy.
    """
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    target = directory.resolve()
    return cwd == target or target in cwd.parents


def _swap_entries(directory: Path, new: Path) -> None:
    """Moves each entry of ``new`` into ``directory`` (which stays in place), or none of them.

    Used for a folder that holds the working directory. Each replaced entry is moved aside
    first and put back if a later move fails; other entries of ``directory`` are untouched.
    """
    aside = Path(tempfile.mkdtemp(prefix=".replaced.", suffix=".old", dir=directory))
    done: list[tuple[str, bool]] = []
    try:
        for entry in sorted(os.listdir(new)):
            had = os.path.lexists(directory / entry)
            if had:
                os.replace(directory / entry, aside / entry)
            done.append((entry, had))
            os.replace(new / entry, directory / entry)
    except BaseException:
        for entry, had in reversed(done):
            if os.path.lexists(directory / entry) and not os.path.lexists(new / entry):
                os.replace(directory / entry, new / entry)
            if had:
                os.replace(aside / entry, directory / entry)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def _swap(directory: Path, new: Path, *, keep_others: bool) -> None:
    """Puts the complete folder ``new`` in the place of ``directory``, or changes nothing."""
    aside = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent)
    )
    old = aside / "old"
    os.replace(directory, old)
    moved: list[str] = []
    try:
        if keep_others:
            for entry in sorted(os.listdir(old)):
                if not (new / entry).exists() and not os.path.islink(new / entry):
                    os.replace(old / entry, new / entry)
                    moved.append(entry)
        os.replace(new, directory)
    except BaseException:
        for entry in moved:
            os.replace(new / entry, old / entry)
        os.replace(old, directory)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def remove_directory(directory: str | os.PathLike[str]) -> None:
    """Deletes a folder this package wrote and no longer needs (a superseded checkpoint).

    Best effort: a folder that is already gone, or a file in it that cannot be removed, is
    not an error, since what it held has been replaced by a complete newer copy.
    """
    shutil.rmtree(directory, ignore_errors=True)


def check_writable(directory: str | os.PathLike[str], *, what: str = "output folder") -> Path:
    """Checks, before any work, that a folder can be created (or written) at ``directory``.

    The nearest existing ancestor must be a folder in which a file can be created; a
    probe file is created there and removed at once, so permissions, read-only mounts and
    ancestors that are files are all caught.

    Raises:
        ConfigError: ``directory`` is an existing file, an ancestor is a file, or the folder
            cannot be written; names the path.
    """
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{what} {str(directory)!r} is an existing file, not a folder")
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {str(directory)!r} cannot be created: {str(probe)!r} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".unlearnlens-probe.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{what} {str(directory)!r} cannot be written: {exc}") from None
    return directory


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 1) -> Path:
    """Writes ``data`` as standard JSON (no NaN literals) atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=False))


def encode_floats(value: Any) -> Any:
    """JSON-ready copy in which non-finite floats become ``{"$float": "nan" | "inf" | "-inf"}``.

    :func:`write_json` refuses NaN literals (they are not standard JSON), so scores that may be
    NaN or infinite go through this first; dict keys become strings and tuples lists.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        return {str(k): encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


def decode_floats(value: Any) -> Any:
    """Inverse of :func:`encode_floats`."""
    if isinstance(value, dict):
        if set(value) == {"$float"}:
            return float(value["$float"])
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes tensors (moved to the CPU, made contiguous) as safetensors atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def read_json(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """Parses a JSON file.

    Raises:
        FileFormatError: The file is missing, unreadable, or not valid JSON; names the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read {what} {str(path)!r}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"{what} {str(path)!r} is not valid JSON (truncated or corrupt?): {exc}"
        ) from None


def read_safetensors(
    path: str | os.PathLike[str], *, what: str = "file", device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Loads every tensor of a safetensors file.

    Raises:
        FileFormatError: The file is missing or not a readable safetensors file; names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} {str(path)!r} does not exist")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(
            f"{what} {str(path)!r} is not a readable safetensors file (truncated or corrupt?): "
            f"{exc}"
        ) from None


def read_safetensors_metadata(
    path: str | os.PathLike[str], *, what: str = "file"
) -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty when it has none).

    Raises:
        FileFormatError: The file is missing or not a readable safetensors file; names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(
            f"{what} {str(path)!r} is not a readable safetensors file (truncated or corrupt?): "
            f"{exc}"
        ) from None
