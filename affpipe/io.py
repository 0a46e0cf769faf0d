"""Small file helpers every stage shares: atomic writes, hashing, JSON-safe values.

"Atomic" here means: the data goes to ``<name>.tmp`` beside the target, is flushed and fsynced,
then renamed over the target, so a kill or a full disk leaves either the old file or the new
one, whole — never a file that looks complete and is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 8 << 20


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``<path>.tmp`` for writing; on success fsync it and rename it to ``path``.

    On any exception (a kill aside) the temporary file is removed and the target untouched; a
    failed write (a full disk) is reported naming ``path`` (:func:`write_error`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path), open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Report a write that fails in the body (a full disk) as one error naming ``path``
    (:func:`write_error`): neither ``write(2)``'s ENOSPC nor torch.save's message names it."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        named = write_error(path, exc)
        if named is exc:
            raise
        raise named from exc


# How torch.save reports a write that failed (a full disk, mostly): no file, no errno.
_TORCH_WRITE_FAILED = ("inline_container", "PytorchStreamWriter", "unexpected pos")


def write_error(path: Path | str, exc: BaseException) -> BaseException:
    """The error to raise for ``exc`` met while writing ``path``: an ``OSError`` or torch's
    writer ``RuntimeError`` becomes one naming the file (``<path>: disk full / could not write
    (<cause>)``); anything else is returned unchanged."""
    text = str(exc).strip()
    if isinstance(exc, RuntimeError) and not any(k in text for k in _TORCH_WRITE_FAILED):
        return exc
    if not isinstance(exc, OSError | RuntimeError) or (isinstance(exc, OSError) and exc.filename is not None):
        return exc
    first = (text.splitlines() or [type(exc).__name__])[0][:200]
    return OSError(f"{path}: disk full / could not write ({first})")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def write_parquet(table: Any, path: Path | str, **kwargs: Any) -> None:
    """``pyarrow.parquet.write_table`` through a temporary name (an interrupted write never
    leaves a table that looks whole)."""
    import pyarrow.parquet as pq

    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh, **kwargs)


def fsync_dir(path: Path | str) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """Plain JSON values: tensors/numpy scalars → Python numbers, non-finite floats → None,
    Paths → str, tuples → lists, dict keys → str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    elif hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float | int):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return value


# ---- names and paths from data: nothing from data is trusted as a path ----------------------

_MAX_NAME_BYTES = 255  # one path component on every common filesystem


def clip(text: object, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, so a 20 MB line never lands in a message."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def safe_name(name: str, where: str) -> str:
    """``name`` when it is a plain file name (a video name of the release), else ``ValueError``.

    Plain: not empty, not ``.``/``..``, no ``/``, ``\\`` or NUL, no control character (a
    newline would split a line of a submission or a list), valid UTF-8, at most 255 bytes.
    ``where`` (``file:line`` or a folder) names the source in the error. The one check every
    name from data, a weight file or a flag passes where it enters, before it becomes a path or a
    line in a file.
    """
    why = None
    if not name or name in (".", ".."):
        why = "is empty or a relative folder name"
    elif "/" in name or "\\" in name or "\0" in name:
        why = "contains a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        why = "contains a control character (a newline, a tab, ...)"
    else:
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            why = "is not valid UTF-8"
            name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        else:
            if len(raw) > _MAX_NAME_BYTES:
                why = f"is longer than {_MAX_NAME_BYTES} bytes"
    if why is not None:
        raise ValueError(f"{where}: name {clip(name)} {why}; names must be plain video names "
                         "(no folders, no '..')")
    return name


def is_safe_name(name: str) -> bool:
    """Whether :func:`safe_name` accepts ``name``."""
    try:
        safe_name(name, "")
    except ValueError:
        return False
    return True


def confined_path(root: Path | str, rel: str | Path, where: str) -> Path:
    """``root / rel`` when ``rel`` is relative, has no ``..`` and resolves inside ``root``
    (symlinks included); else ``ValueError`` naming ``where``. Every path built from data goes
    through here before it is opened or written."""
    rel_s = str(rel)
    parts = Path(rel_s).parts
    if not rel_s or Path(rel_s).is_absolute() or rel_s.startswith(("/", "\\")) or ".." in parts or "\0" in rel_s:
        raise ValueError(f"{where}: path {clip(rel_s)} is not a relative path inside {root}")
    path = Path(root) / rel_s
    base = Path(root).resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{where}: path {clip(rel_s)} leads outside {root} (to {resolved})")
    return path


def atomic_copy(src: Path | str, dst: Path | str) -> None:
    """Copy ``src`` to ``dst`` through a temporary name (see :func:`atomic_open`)."""
    import shutil

    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
