"""Output folders owned by the command that writes them.

Every affpipe command that writes a folder (``index``, ``embed``, ``train``, ``predict``,
``experiments``, ``report``; ``shard`` keeps its own ``shards/folder.py``) claims it first:

- a folder is the command's when it holds ``.affpipe.json`` naming that command; a new or empty
  folder is claimed by writing that marker. A non-empty folder without the marker, or with
  another command's, is refused: nothing of a user's is ever taken for ours.
- only names the command writes (``Owner.patterns``: relative POSIX paths matched one path
  component at a time, so ``*`` never crosses a ``/``; a whole ``**`` component spans any depth)
  may be there; any other file, at any depth, and any symlink at all, at any depth, is refused by
  name (so a ``parts -> /elsewhere`` link can never make us write or delete outside the folder).
  The walk (:func:`walk`) never follows a link; every command's folder check goes through it.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affpipe.io import atomic_write_text, jsonable, writing

log = logging.getLogger(__name__)

MARKER = ".affpipe.json"
LOCK = ".affpipe.lock"
_OURS = (MARKER, MARKER + ".tmp", LOCK)
OUTDIR_VERSION = 1


@dataclass(frozen=True)
class Owner:
    """A command and the relative paths it writes: patterns matched per path component
    (:func:`path_matches`: ``*`` stays inside one folder level; ``**`` alone spans levels)."""

    command: str
    patterns: tuple[str, ...]

    def owns(self, rel: str) -> bool:
        """Whether ``rel`` (relative POSIX path) is a name this command writes (temporaries included)."""
        name = rel[:-4] if rel.endswith(".tmp") else rel
        return rel in _OURS or any(path_matches(name, p) for p in self.patterns)


def path_matches(rel: str, pattern: str) -> bool:
    """Whether relative POSIX path ``rel`` matches ``pattern`` component by component: each
    component of the pattern matches exactly one of ``rel`` (shell-style, case-sensitive, so
    ``VA/*.txt`` matches ``VA/v1.txt`` and never ``VA/old/keep.txt``); a component that is exactly
    ``**`` matches one or more whole components (``data/**``: anything below ``data/``)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        return False
    return _match_parts(parts, pattern.split("/"))


def _match_parts(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(1, len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


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
        """Delete the owner's files (never a file, folder or link of a user's, at any depth);
        returns how many. Only folders emptied here are removed, deepest first."""
        entries = list(walk(self.out))
        if any(kind != "file" for _, kind in entries):  # claim refused these already: never act on a link
            raise ValueError(f"{self.out}: holds a symlink or special file; nothing removed")
        removed, emptied = 0, set()
        for rel, _ in entries:
            if rel not in _OURS and self.owner.owns(rel):
                (self.out / rel).unlink()
                removed += 1
                emptied.update(Path(rel).parents)
        for d in sorted((d for d in emptied if d != Path(".")), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: a user's file is there; kept
                os.rmdir(self.out / d)
        return removed


def walk(out: Path | str) -> Iterator[tuple[str, str]]:
    """``(relative POSIX path, "file" | "symlink" | "other")`` of every entry under ``out``, at
    every depth, sorted per folder, by ``lstat`` semantics (``os.scandir``): a symlink (to a file or a
    folder) is reported as ``"symlink"`` and never followed; folders are descended, not listed.
    The one walk every output-folder check uses."""
    out = Path(out)
    stack = [""]
    while stack:
        prefix = stack.pop()
        with os.scandir(out / prefix if prefix else out) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            rel = f"{prefix}/{e.name}" if prefix else e.name
            # the entry's type as lstat gives it (d_type: no syscall per file in a 2.9M-frame tree)
            if e.is_symlink():
                yield rel, "symlink"
            elif e.is_dir(follow_symlinks=False):
                subdirs.append(rel)
            else:
                yield rel, "file" if e.is_file(follow_symlinks=False) else "other"
        stack.extend(reversed(subdirs))


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
    entries = list(walk(out))
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
          also: tuple[Owner, ...] = (), reuse: Callable[[Path], bool] | None = None) -> Iterator[Claim]:
    """Claim ``out`` for ``owner`` (see the module docstring) and hold its lock while the body runs.

    ``inputs`` (JSON values) fingerprint what the output is made from: a folder made from other
    inputs is refused naming both sides, unless ``overwrite`` (which deletes only our files).
    ``reuse(out)`` true (asked again under the lock): the folder holds nothing of ours worth
    keeping (a run that failed before its first step), so its files go as with ``overwrite``.
    """
    out = Path(out)
    inputs = jsonable(dict(inputs))
    reused = not overwrite and reuse is not None and out.is_dir() and check_folder(out, owner, also=also) is not None \
        and reuse(out)
    preflight(out, owner, inputs, overwrite=overwrite or reused, also=also)  # read-only: no lock file in a foreign folder
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, LOCK, f"affpipe {owner.command}"):
        reused = reused and reuse(out)  # again, under the lock: nothing of worth appeared meanwhile
        keep = preflight(out, owner, inputs, overwrite=overwrite or reused, also=also)  # again, under the lock
        c = Claim(out, owner, fresh=not keep)
        if keep and (overwrite or reused):
            n = c.remove_own()
            log.info("%s: removed %d file(s) of `affpipe %s` from %s", "--overwrite" if overwrite else
                     "nothing kept of a run that never started", n, owner.command, out)
            c.fresh = True
        c.existing = [rel for rel, kind in walk(out) if kind == "file" and rel not in _OURS]
        _write_marker(out, owner, inputs)
        yield c


def preflight(out: Path | str, owner: Owner, inputs: Mapping[str, Any], *, overwrite: bool = False,
              also: tuple[Owner, ...] = ()) -> bool:
    """:func:`claim`'s refusals without writing anything (run it before long work, so a refused
    folder costs nothing); True when ``out`` holds files of ``owner``'s to resume from or replace."""
    out = Path(out)
    marker = check_folder(out, owner, also=also)
    if marker is None or not any(kind == "file" and rel not in _OURS for rel, kind in walk(out)):
        return False  # new, empty, or marked with nothing written yet (stopped early): nothing to keep
    diffs = input_differences(marker.get("inputs") or {}, jsonable(dict(inputs)))
    if diffs and not overwrite:
        raise FileExistsError(f"{out}: was made by `affpipe {owner.command}` from other inputs ("
                              + "; ".join(diffs) + "); choose a new folder or pass --overwrite "
                              "(deletes only affpipe's own files there)")
    return True


def _write_marker(out: Path, owner: Owner, inputs: Mapping[str, Any]) -> None:
    atomic_write_text(out / MARKER, json.dumps({"command": owner.command, "version": OUTDIR_VERSION,
                                                 "inputs": inputs}, indent=2, sort_keys=True) + "\n")


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
            with writing(path):  # a full disk: name the lock file, not just "[Errno 28]"
                os.ftruncate(fh.fileno(), 0)
                os.pwrite(fh.fileno(), f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def unmarked_and_only_own(out: Path, owner: Owner) -> bool:
    """A non-empty folder without a marker that holds only plain files named as ``owner`` writes
    them: what an affpipe from before markers left (0.2). Whether it is really ``owner``'s output
    is the caller's to prove (its main file must load as one) before :func:`adopt`."""
    out = Path(out)
    if not out.is_dir() or out.is_symlink() or read_marker(out) is not None:
        return False
    entries = [(rel, kind) for rel, kind in walk(out) if rel != LOCK]
    return bool(entries) and all(kind == "file" and owner.owns(rel) for rel, kind in entries)


def adopt(out: Path, owner: Owner, inputs: Mapping[str, Any]) -> None:
    """Write ``owner``'s marker with ``inputs`` into a folder :func:`unmarked_and_only_own` accepts
    (checked again under the lock), so that :func:`claim` takes it as ``owner``'s from then on."""
    out = Path(out)
    with folder_lock(out, LOCK, f"affpipe {owner.command}"):
        if not unmarked_and_only_own(out, owner):
            raise FileExistsError(f"{out}: changed while being checked; run again")
        _write_marker(out, owner, jsonable(dict(inputs)))
    log.warning("%s: a folder of `affpipe %s` from before ownership markers; adopted (%s written)",
                out, owner.command, MARKER)
