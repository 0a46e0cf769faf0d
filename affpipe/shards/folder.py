"""The shard output folder: what ``affpipe shard`` may write into, and one writer at a time.

A folder is affpipe's when it holds ``.state/`` (created before the first shard). Only names
``write_shard`` produces (``<split>/<split>-NNNNNN.tar|.idx[.tmp]``, ``.state/<split>-NNNNNN.json``,
``manifest.json``, ``.lock``) are ever removed; a folder holding anything else is refused, naming
it, so a user's ``train/train-notes.txt`` is never deleted as a stale shard.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from affpipe.labels import SPLITS
from affpipe.outdir import folder_lock

log = logging.getLogger(__name__)

SHARD_NAME = r"{split}-(?:unlabelled-)?\d{{6}}\.(?:tar|idx)(?:\.tmp)?"  # what write_shard leaves in <out>/<split>/
STATE_NAME = r"{split}-(?:unlabelled-)?\d{{6}}\.json(?:\.tmp)?"  # and in <out>/.state/
_TOP = ("manifest.json", "manifest.json.tmp", ".state", ".lock", *SPLITS)


def own_shard_file(split: str, name: str) -> bool:
    """Whether ``name`` in ``<out>/<split>/`` is a file ``affpipe shard`` writes."""
    return re.fullmatch(SHARD_NAME.format(split=split), name) is not None


def own_state_file(split: str, name: str) -> bool:
    """Whether ``name`` in ``<out>/.state/`` is a state record of ``split``."""
    return re.fullmatch(STATE_NAME.format(split=split), name) is not None


def foreign_files(out: Path) -> list[str]:
    """Entries of ``out`` that ``affpipe shard`` did not write (relative names, sorted)."""
    if not out.is_dir():
        return []
    foreign = [p.name for p in out.iterdir() if p.name not in _TOP]
    for split in SPLITS:
        if (out / split).is_dir():
            foreign += [f"{split}/{p.name}" for p in (out / split).iterdir() if not own_shard_file(split, p.name)]
        elif (out / split).exists():
            foreign.append(split)
    if (out / ".state").is_dir():
        foreign += [f".state/{p.name}" for p in (out / ".state").iterdir()
                    if not any(own_state_file(sp, p.name) for sp in SPLITS)]
    return sorted(foreign)


def check_output_folder(out: Path) -> None:
    """``out`` may be written into: new, empty, or a shard folder of ours holding only our files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not (out / ".state").is_dir():
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
        for p in sorted(folder.iterdir()):
            if own(split, p.name) and (p.name.endswith(".tmp") or p.name.split(".", 1)[0] not in planned):
                log.info("removing %s (unfinished or not in the plan)", p)
                p.unlink()
