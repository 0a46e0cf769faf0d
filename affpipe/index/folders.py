"""What a challenge folder holds: its split folders, the test lists in it, and the rest.

The releases spelled their split folders differently (ABAW1, 2020: ``Training_Set``; ABAW2+:
``Train_Set``; every edition: ``Validation_Set``), and users' copies gain folders of their own
(``Train_Set_refinement``, ``TestSet/``, ``merged/``). Every folder and ``.txt`` under a challenge
folder is either read or reported with the reason it is not, so labelled data never disappears
without a word; a challenge folder whose annotation files all sit outside a recognised split
folder is an error that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from affpipe.index.testsets import is_test_list_name

# lower-cased folder name -> split
SPLIT_FOLDERS: dict[str, str] = {
    "train_set": "train", "training_set": "train", "train": "train", "training": "train",
    "validation_set": "val", "valid_set": "val", "val_set": "val", "validation": "val", "val": "val",
}
SPLIT_SPELLINGS = "Train_Set, Training_Set, Validation_Set (any case)"
_SEARCH_DEPTH = 3  # how deep an unknown folder is searched for .txt files and test lists


@dataclass(frozen=True)
class Unused:
    """A folder or file under the tree that the index does not read, and why."""

    path: Path
    reason: str
    txt_files: int = 0  # .txt files not read because of it (the file itself, or those in the folder)

    def describe(self) -> dict:
        """JSON-able form for ``index.json``."""
        return {"path": str(self.path), "reason": self.reason, "txt_files": self.txt_files}


@dataclass(frozen=True)
class ChallengeContents:
    """What :func:`scan_challenge` found in one challenge folder."""

    files: tuple[tuple[str, str, Path], ...]  # (split, video, path) of every <video>.txt read
    test_lists: tuple[Path, ...]
    unused: tuple[Unused, ...]


def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def _is_txt(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(".txt") and entry.is_file()


def search_txt(path: Path, depth: int = _SEARCH_DEPTH) -> tuple[list[Path], int]:
    """Test lists under ``path`` (by name) and the number of other ``.txt`` files, ``depth`` levels deep."""
    lists, others = [], 0
    for e in _entries(path):
        if _is_txt(e):
            if is_test_list_name(e.name):
                lists.append(Path(e.path))
            else:
                others += 1
        elif depth > 0 and e.is_dir():
            sub_lists, sub_others = search_txt(Path(e.path), depth - 1)
            lists += sub_lists
            others += sub_others
    return lists, others


def _split_folder(folder: Path, split: str) -> tuple[list[tuple[str, str, Path]], list[Unused]]:
    files, unused = [], []
    for e in _entries(folder):
        if _is_txt(e):
            files.append((split, e.name[:-4], Path(e.path)))
        elif e.is_dir():
            _, n = search_txt(Path(e.path))
            unused.append(Unused(Path(e.path), f"folder inside a split folder ({n} .txt file(s) not read); "
                                               "only <video>.txt files directly in it are read", n))
    return files, unused


def scan_challenge(folder: Path) -> ChallengeContents:
    """Sort a challenge folder's entries into annotation files, test lists and unused entries.

    Raises ``ValueError`` naming the folder when it holds ``.txt`` files but none in a
    recognised split folder (a layout this version does not know must not index as empty).
    """
    files: list[tuple[str, str, Path]] = []
    lists: list[Path] = []
    unused: list[Unused] = []
    stray = 0
    for e in _entries(folder):
        path = Path(e.path)
        if e.is_dir():
            split = SPLIT_FOLDERS.get(e.name.lower())
            if split is not None:
                got, skipped = _split_folder(path, split)
                files += got
                unused += skipped
                stray += sum(u.txt_files for u in skipped)
                continue
            sub_lists, others = search_txt(path)
            lists += sub_lists
            stray += others
            if others or not sub_lists:
                unused.append(Unused(path, f"not a split folder ({SPLIT_SPELLINGS}); {others} .txt file(s) not read",
                                     others))
        elif _is_txt(e):
            if is_test_list_name(e.name):
                lists.append(path)
            else:
                stray += 1
                unused.append(Unused(path, "annotation file outside a split folder", 1))
    if stray and not files:
        where = ", ".join(str(u.path.name) for u in unused[:5])
        raise ValueError(f"{folder}: {stray} .txt file(s) but none in a split folder ({SPLIT_SPELLINGS}); "
                         f"found in: {where}")
    return ChallengeContents(tuple(files), tuple(lists), tuple(unused))
