"""Output folders owned by the command that writes them.

Every affpipe command that writes a folder (``index``, ``embed``, ``train``, ``predict``,
``experiments``, ``report``; ``shard`` keeps its own ``shards/folder.py``) claims it first:

- a folder is the command's when it holds ``.affpipe.json`` naming that command; a new or empty
  folder is claimed by writing that marker. A non-empty folder without the marker, or with
  another command's, is refused: nothing of a user's is ever taken for ours.
- only names the command writes (``Owner.patterns``, shell-style, relative POSIX paths) may be
  there; any other file, and any symlink at all, is refused by name (so a ``parts -> /elsewhere``
  link can never make us write or delete outside the folder).
- the marker records the command's ``inputs`` (a fingerprint of what the output is made from);
  a rerun with other inputs is refused with both sides named, unless ``overwrite``, which deletes
  the command's own files only, then starts afresh.
- one writer at a time: an exclusive ``flock`` on ``.affpipe.lock``, dropped by the kernel when
  the holder dies (kill -9 included).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affpipe.io import atomic_write_text, jsonable

log = logging.getLogger(__name__)

MARKER = ".affpipe.json"
LOCK = ".affpipe.lock"
_OURS = (MARKER, MARKER + ".tmp", LOCK)
OUTDIR_VERSION = 1


@dataclass(frozen=True)
class Owner:
    """A command and the relative paths it writes (``fnmatch`` patterns; ``*`` spans folders)."""

    command: str
    patterns: tuple[str, ...]

    def owns(self, rel: str) -> bool:
        """Whether ``rel`` (relative POSIX path) is a name this command writes (temporaries included)."""
        name = rel[:-4] if rel.endswith(".tmp") else rel
        return rel in _OURS or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


@dataclass
class Claim:
    """A claimed output folder: ``fresh`` when nothing of ours was there before."""

    out: Path
    owner: Owner
    fresh: bool
    existing: list[str] = field(default_factory=list)  # our files found at claim time

    def path(self, rel: str) -> Path:
        """``out / rel`` for a name the owner writes; parents are created, never through a symlink."""
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not self.owner.owns(rel):
            raise ValueError(f"{self.out}: {rel!r} is not a file `affpipe {self.owner.command}` writes")
        target = self.out / rel
        parent = self.out
        for part in Path(rel).parts[:-1]:
            parent = parent / part
            if parent.is_symlink():
                raise ValueError(f"{parent}: is a symlink; affpipe never writes through one")
            parent.mkdir(exist_ok=True)
        if target.is_symlink():
            raise ValueError(f"{target}: is a symlink; affpipe never writes through one")
        return target

    def remove_own(self) -> int:
        """Delete the owner's files (never the marker's neighbours of a user); returns how many."""
        removed = 0
        for rel, kind in _walk(self.out):
            if kind == "file" and rel not in _OURS and self.owner.owns(rel):
                (self.out / rel).unlink()
                removed += 1
        for dirpath, dirs, files in sorted(os.walk(self.out, topdown=False), reverse=True):
            if Path(dirpath) != self.out and not dirs and not files:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        return removed


def _walk(out: Path) -> Iterator[tuple[str, str]]:
    """``(relative path, "file" | "symlink" | "other")`` of everything under ``out``; symlinks
    are reported and never followed."""
    for dirpath, dirs, files in os.walk(out, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirs):
            p = base / name
            if p.is_symlink():
                yield p.relative_to(out).as_posix(), "symlink"
        dirs[:] = sorted(d for d in dirs if not (base / d).is_symlink())
        for name in sorted(files):
            p = base / name
            kind = "symlink" if p.is_symlink() else ("file" if p.is_file() else "other")
            yield p.relative_to(out).as_posix(), kind


def read_marker(out: Path) -> dict[str, Any] | None:
    """The folder's ``.affpipe.json``, or None when there is none."""
    path = Path(out) / MARKER
    if path.is_symlink():
        raise ValueError(f"{path}: is a symlink; not a folder affpipe wrote")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); not a folder affpipe can resume") from None
    if not isinstance(data, dict) or "command" not in data:
        raise ValueError(f"{path}: not an affpipe folder marker")
    return data


def input_differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: <before> (in the folder) vs <now>`` for each input that changed."""
    keys = sorted(set(before) | set(now))
    return [f"{k}: {before.get(k)!r} (in the folder) vs {now.get(k)!r} (now)" for k in keys
            if before.get(k) != now.get(k)]


def check_folder(out: Path, owner: Owner, *, also: tuple[Owner, ...] = ()) -> dict[str, Any] | None:
    """Refuse ``out`` unless it is new, empty, or ``owner``'s holding only names ``owner`` (or one
    of ``also``, commands that may add files to it) writes; returns its marker (None when new)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.is_dir():
        return None
    entries = list(_walk(out))
    marker = read_marker(out)
    if marker is None:
        others = [rel for rel, _ in entries if rel != LOCK]
        if others:
            more = ", ..." if len(others) > 8 else ""
            raise FileExistsError(f"{out}: not empty and not written by `affpipe {owner.command}` (holds "
                                  f"{', '.join(others[:8])}{more}); choose a new or empty folder")
        return None
    if marker["command"] != owner.command:
        raise FileExistsError(f"{out}: written by `affpipe {marker['command']}`, not `affpipe {owner.command}`; "
                              "choose another folder")
    foreign = [f"{rel} ({kind})" if kind != "file" else rel for rel, kind in entries
               if kind != "file" or not any(o.owns(rel) for o in (owner, *also))]
    if foreign:
        more = ", ..." if len(foreign) > 8 else ""
        raise FileExistsError(f"{out}: holds files `affpipe {owner.command}` did not write ({', '.join(foreign[:8])}"
                              f"{more}); move them away or choose another folder")
    return marker


@contextlib.contextmanager
def claim(out: Path | str, owner: Owner, inputs: Mapping[str, Any], *, overwrite: bool = False,
          also: tuple[Owner, ...] = ()) -> Iterator[Claim]:
    """Claim ``out`` for ``owner`` (see the module docstring) and hold its lock while the body runs.

    ``inputs`` (JSON values) fingerprint what the output is made from: a folder made from other
    inputs is refused naming both sides, unless ``overwrite`` (which deletes only our files).
    """
    out = Path(out)
    check_folder(out, owner, also=also)  # read-only: a foreign folder gets no lock file of ours
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, LOCK, f"affpipe {owner.command}"):
        marker = check_folder(out, owner, also=also)  # again, under the lock
        inputs = jsonable(dict(inputs))
        c = Claim(out, owner, fresh=marker is None)
        if marker is not None:
            diffs = input_differences(marker.get("inputs") or {}, inputs)
            if diffs and not overwrite:
                raise FileExistsError(f"{out}: was made by `affpipe {owner.command}` from other inputs ("
                                      + "; ".join(diffs) + "); choose a new folder or pass --overwrite "
                                      "(deletes only affpipe's own files there)")
            if overwrite:
                n = c.remove_own()
                log.info("--overwrite: removed %d file(s) of `affpipe %s` from %s", n, owner.command, out)
                c.fresh = True
        c.existing = [rel for rel, kind in _walk(out) if kind == "file" and rel not in _OURS]
        atomic_write_text(out / MARKER, json.dumps({"command": owner.command, "version": OUTDIR_VERSION,
                                                     "inputs": inputs}, indent=2, sort_keys=True) + "\n")
        yield c


@contextlib.contextmanager
def folder_lock(out: Path, name: str, who: str) -> Iterator[None]:
    """One writer per folder: an exclusive ``flock`` on ``out/name``, refused while ``who`` (another
    process) holds it. The kernel drops it when the holder dies, so a stale file never blocks."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent runs stay unsupported there
        yield
        return
    path = out / name
    if path.is_symlink():
        raise ValueError(f"{path}: is a symlink; affpipe never writes through one")
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise FileExistsError(f"{out}: busy: another `{who}` (pid {holder}) is writing into it") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
