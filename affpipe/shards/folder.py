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
import logging
import re
from pathlib import Path

from affpipe.labels import SPLITS
from affpipe.outdir import folder_lock, walk

log = logging.getLogger(__name__)

SHARD_NAME = r"{split}-\d{{6}}\.(?:tar|idx)(?:\.tmp)?"  # what write_shard leaves in <out>/<split>/
STATE_NAME = r"{split}-\d{{6}}\.json(?:\.tmp)?"  # and in <out>/.state/
_TOP = ("manifest.json", "manifest.json.tmp", ".state", ".lock", *SPLITS)


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
        return any(own_state_file(sp, name) for sp in SPLITS)
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
