"""The shard output folder: what ``affpipe shard`` may write into, and one writer at a time.

A folder is affpipe's when it holds ``.state/`` (created before the first shard). Only names
``write_shard`` produces (``<split>/<split>-NNNNNN.tar|.idx[.tmp]``, ``.state/<split>-NNNNNN.json``,
``manifest.json``, ``.lock``) are ever removed; a folder holding anything else, at any depth, is
refused, naming it, so a user's ``train/train-notes.txt`` is never deleted as a stale shard. The
folder is read with :func:`affpipe.outdir.walk` (``lstat``, links never followed): a split or
``.state`` folder that is a symlink (``test -> ../userS``), or any link below it, is refused
before anything is written or removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from affpipe.io import atomic_write_text
from affpipe.labels import SPLITS
from affpipe.outdir import folder_lock, input_differences, walk

log = logging.getLogger(__name__)

SHARD_NAME = r"{split}-(?:unlabelled-)?\d{{6}}\.(?:tar|idx)(?:\.tmp)?"  # what write_shard leaves in <out>/<split>/
STATE_NAME = r"{split}-(?:unlabelled-)?\d{{6}}\.json(?:\.tmp)?"  # and in <out>/.state/
_TOP = ("manifest.json", "manifest.json.tmp", ".state", ".lock", *SPLITS)
INPUTS = "inputs.json"  # in .state/: what the shards are made from (the index's fingerprint, the options)


def own_shard_file(split: str, name: str) -> bool:
    """Whether ``name`` in ``<out>/<split>/`` is a file ``affpipe shard`` writes."""
    return re.fullmatch(SHARD_NAME.format(split=split), name) is not None


def own_state_file(split: str, name: str) -> bool:
    """Whether ``name`` in ``<out>/.state/`` is a state record of ``split``."""
    return re.fullmatch(STATE_NAME.format(split=split), name) is not None


def _own(rel: str) -> bool:
    parts = rel.split("/")
    if len(parts) == 1:
        return rel in _TOP and rel not in (".state", *SPLITS)
    if len(parts) != 2:
        return False
    folder, name = parts
    if folder == ".state":
        return name in (INPUTS, INPUTS + ".tmp") or any(own_state_file(sp, name) for sp in SPLITS)
    return folder in SPLITS and own_shard_file(folder, name)


def foreign_files(out: Path) -> list[str]:
    """Entries of ``out``, at any depth, that ``affpipe shard`` did not write (relative names,
    sorted; a symlink anywhere, a split or ``.state`` folder included, as ``name (symlink)``)."""
    if not out.is_dir():
        return []
    return sorted(rel if kind == "file" else f"{rel} ({kind})" for rel, kind in walk(out)
                  if kind != "file" or not _own(rel))


def check_output_folder(out: Path) -> None:
    """``out`` may be written into: new, empty, or a shard folder of ours holding only our files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not (out / ".state").is_dir():  # (a linked .state is named below, as every link)
        raise FileExistsError(f"{out}: not empty and not a shard folder of affpipe (holds {', '.join(entries[:10])}); "
                              "choose a new or empty folder")
    foreign = foreign_files(out)
    if foreign:
        more = ", ..." if len(foreign) > 10 else ""
        raise FileExistsError(f"{out}: holds files affpipe did not write ({', '.join(foreign[:10])}{more}); "
                              "move them away or choose another folder")


def writer_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """One ``affpipe shard`` per folder (an exclusive ``flock`` on ``out/.lock``; see
    :func:`affpipe.outdir.folder_lock`)."""
    return folder_lock(out, ".lock", "affpipe shard")


def remove_stale(out: Path, split: str, planned: set[str]) -> None:
    """Remove our leftovers of ``split``: temporary files of a killed run and shards (and their
    state records) no longer in the plan. Nothing whose name we do not write is touched."""
    for folder, own in ((out / split, own_shard_file), (out / ".state", own_state_file)):
        if folder.is_symlink() or not folder.is_dir():  # (refused by check_output_folder already)
            raise FileExistsError(f"{folder}: is not a folder of affpipe shard's (a symlink?); nothing removed")
        for p in sorted(folder.iterdir()):
            if own(split, p.name) and (p.name.endswith(".tmp") or p.name.split(".", 1)[0] not in planned):
                log.info("removing %s (unfinished or not in the plan)", p)
                p.unlink()


def remove_temporaries(out: Path, split: str) -> None:
    """Remove our ``.tmp`` files of ``split`` (a failed or stopped write's), nothing else."""
    for folder, own in ((out / split, own_shard_file), (out / ".state", own_state_file)):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if p.name.endswith(".tmp") and own(split, p.name) and not p.is_symlink():
                    p.unlink(missing_ok=True)


def recorded_inputs(out: Path) -> dict[str, Any] | None:
    """What the shards in ``out`` were made from: ``.state/inputs.json``, else (a folder of an
    affpipe before it) its manifest's index fingerprint and options; None when neither is there."""
    for path, pick in ((out / ".state" / INPUTS, lambda d: d),
                       (out / "manifest.json", lambda d: {"index_fingerprint": d.get("index_fingerprint"),
                                                          **(d.get("options") or {})})):
        if path.is_file() and not path.is_symlink():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: unreadable ({exc}); not a shard folder affpipe can resume") from None
            return pick(data) if isinstance(data, dict) else None
    return None


def check_inputs(out: Path, inputs: dict[str, Any], overwrite: bool) -> bool:
    """Refuse shards made from other ``inputs`` (both sides named) unless ``overwrite``; True when
    the folder's own files are to be replaced (``overwrite`` and other inputs)."""
    before = recorded_inputs(out)
    if before is not None and not before.get("unlabelled", False) and inputs.get("unlabelled"):
        # adding the unlabelled shards (0.3 folders, --no-unlabelled ones) deletes nothing: the
        # labelled shards do not depend on them (their plan leaves the option out)
        before = {**before, "unlabelled": True}
    if before is None or before == inputs:
        return False
    if not overwrite:
        raise FileExistsError(f"{out}: holds shards made from other inputs ({'; '.join(input_differences(before, inputs))}); "
                              "choose a new folder or pass --overwrite (deletes only affpipe's own shard files there)")
    return True


def record_inputs(out: Path, inputs: dict[str, Any]) -> None:
    """Write ``.state/inputs.json`` (before any shard: a killed run's folder says what it was)."""
    atomic_write_text(out / ".state" / INPUTS, json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def remove_own(out: Path) -> int:
    """``--overwrite``: delete every file ``affpipe shard`` wrote in ``out`` (shards, indexes, state,
    manifest), nothing else; the caller checked the folder holds nothing else and no link."""
    removed = 0
    for rel, kind in walk(out):
        if kind == "file" and _own(rel) and rel != ".lock":
            (out / rel).unlink()
            removed += 1
    return removed
