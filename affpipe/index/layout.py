"""Find an Aff-Wild2 tree's layout (any ABAW edition): challenge folders, split folders,
annotation files, image roots, MTL files and test lists, under any annotation root name."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from affpipe.index.folders import Unused, scan_challenge, search_txt
from affpipe.index.testsets import is_test_list_name
from affpipe.io import clip, safe_name
from affpipe.labels import TASKS

log = logging.getLogger(__name__)

# Challenge folder name -> (task, edition rank, editions). A higher rank is a newer naming.
CHALLENGE_DIRS: dict[str, tuple[str, int, str]] = {
    "VA_Set": ("va", 1, "abaw1-2"),
    "VA_Estimation_Challenge": ("va", 3, "abaw3+"),
    "EXPR_Set": ("expr", 1, "abaw1-2"),
    "Expression_Set": ("expr", 1, "abaw1 (some copies)"),
    "EXPR_Classification_Challenge": ("expr", 3, "abaw3-5"),
    "EXPR_Recognition_Challenge": ("expr", 6, "abaw6+"),
    "AU_Set": ("au", 1, "abaw1-2"),
    "AU_Detection_Challenge": ("au", 3, "abaw3+"),
}
MTL_FILES = {
    "training_set_annotations.txt": "train",
    "validation_set_annotations.txt": "val",
}
MTL_CHALLENGE_FILES = {"train_set.txt": "train", "validation_set.txt": "val"}
_FRAME_JPG = re.compile(r"\d+\.jpg", re.IGNORECASE)
_MAX_DEPTH = 8


# --- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationFile:
    """One ``<video>.txt`` of a challenge folder."""

    task: str
    split: str  # the folder it sits in: "train" | "val" (any spelling, see folders.SPLIT_FOLDERS)
    video: str
    path: Path


@dataclass(frozen=True)
class Layout:
    """What :func:`find_layout` found under a root."""

    root: Path
    challenges: dict[str, Path]  # task -> challenge folder used
    files: tuple[AnnotationFile, ...]
    image_roots: tuple[Path, ...]
    mtl_files: dict[str, Path] = field(default_factory=dict)  # split -> MTL file
    ignored: tuple[Path, ...] = ()  # older-edition challenge folders not used
    unused: tuple[Unused, ...] = ()  # every folder / .txt not read, with the reason
    test_lists: tuple[Path, ...] = ()  # test-set lists found in the tree (affpipe.index.testsets)

    def describe(self) -> dict:
        """JSON-able description for ``index.json``."""
        return {
            "root": str(self.root),
            "challenges": {
                t: {"folder": str(p), "name": p.name, "editions": CHALLENGE_DIRS[p.name][2],
                    "files": {s: sum(1 for f in self.files if f.task == t and f.split == s)
                              for s in ("train", "val")}}
                for t, p in self.challenges.items()
            },
            "image_roots": [str(p) for p in self.image_roots],
            "mtl_files": {s: str(p) for s, p in self.mtl_files.items()},
            "ignored": [str(p) for p in self.ignored],
            "unused": [u.describe() for u in self.unused],
            "test_lists": [str(p) for p in self.test_lists],
        }


def _subdirs(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if not e.name.startswith(".") and e.is_dir()]
    except PermissionError as exc:  # a folder we cannot list hides annotations: say so
        raise PermissionError(exc.errno, "cannot list this folder (permission denied)", str(path)) from None
    except FileNotFoundError:  # removed while we walk
        return []


def _dir_key(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the folder a link leads to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _looks_like_image_root(subdirs: list[os.DirEntry]) -> bool:
    """A folder of ``<video>/<frame>.jpg``: one of its first subfolders holds frame JPEGs.

    Only the first entries of a few subfolders are read, so a 47k-frame video costs nothing.
    """
    for entry in sorted(subdirs, key=lambda e: e.name)[:3]:
        try:
            with os.scandir(entry.path) as it:
                for i, f in enumerate(it):
                    if _FRAME_JPG.fullmatch(f.name):
                        return True
                    if i >= 50:
                        break
        except OSError:
            continue
    return False


def find_layout(root: Path, images: tuple[Path, ...] = ()) -> Layout:
    """Search ``root`` recursively for challenge folders, MTL files and image roots.

    ``images`` (non-empty) replaces the automatic image-root search.

    (Over 60 lines on purpose: one walk of the tree that sorts what it meets — challenge folders,
    MTL files, test lists, image roots, loops, unreadable folders — into the same few lists.)
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    found: dict[str, list[Path]] = {t: [] for t in TASKS}
    mtl: dict[str, list[Path]] = {"train": [], "val": []}
    image_roots: list[Path] = []
    test_lists: list[Path] = []
    # Each folder is entered once: a symlink back to an ancestor is a loop (an error), another
    # path to a folder already seen is skipped (it would count its challenge folders twice).
    seen: dict[tuple[int, int] | None, str] = {_dir_key(root): str(root)}
    stack: list[tuple[Path, int, tuple]] = [(root, 0, (_dir_key(root),))]
    while stack:
        d, depth, chain = stack.pop()
        subdirs = _subdirs(d)
        test_lists += _test_lists_in(d)
        for name, split in MTL_FILES.items():
            if (d / name).is_file():
                mtl[split].append(d / name)
        if d.name == "MTL_Challenge":
            for name, split in MTL_CHALLENGE_FILES.items():
                if (d / name).is_file():
                    mtl[split].append(d / name)
        if d.name in CHALLENGE_DIRS:
            found[CHALLENGE_DIRS[d.name][0]].append(d)
            continue
        if not images and _looks_like_image_root(subdirs):
            image_roots.append(d)
            continue
        if depth < _MAX_DEPTH:
            for e in subdirs:
                key = _dir_key(e.path)
                if key is None:  # cannot stat it: nothing to compare, and scandir will say why
                    stack.append((Path(e.path), depth + 1, chain))
                    continue
                if key in chain:
                    raise ValueError(f"{e.path}: symlink loop: it leads back to {seen.get(key, '?')}; "
                                     "affpipe follows no symlink twice")
                if key in seen:
                    log.warning("skipping %s: the same folder as %s (reached through a symlink)", e.path, seen[key])
                    continue
                seen[key] = e.path
                stack.append((Path(e.path), depth + 1, (*chain, key)))

    challenges: dict[str, Path] = {}
    ignored: list[Path] = []
    for task, dirs in found.items():
        if not dirs:
            continue
        best = max(CHALLENGE_DIRS[p.name][1] for p in dirs)
        top = sorted(p for p in dirs if CHALLENGE_DIRS[p.name][1] == best)
        if len(top) > 1:
            raise ValueError(
                f"{root}: {len(top)} {task.upper()} challenge folders of the same edition "
                f"({', '.join(map(str, top))}); point ROOT at one edition's tree"
            )
        challenges[task] = top[0]
        ignored += sorted(p for p in dirs if p != top[0])
    for p in ignored:
        log.warning("ignoring older-edition challenge folder %s", p)

    files, unused = [], [_ignored_folder(p, challenges) for p in ignored]
    for task, cdir in sorted(challenges.items()):
        contents = scan_challenge(cdir)
        files += [AnnotationFile(task, split, safe_name(video, f"{path.parent}: annotation file {clip(path.name)}"), path)
                  for split, video, path in contents.files]
        test_lists += contents.test_lists
        unused += contents.unused
    files.sort(key=lambda f: (f.task, f.split, f.video))

    mtl_files = {}
    for split, paths in mtl.items():
        if len(paths) > 1:
            raise ValueError(f"{root}: several MTL {split} files ({', '.join(map(str, sorted(paths)))})")
        if paths:
            mtl_files[split] = paths[0]
    roots = tuple(Path(p).resolve() for p in images) if images else tuple(sorted(image_roots))
    for p in roots:
        if not p.is_dir():
            raise ValueError(f"{p}: image root is not a directory")
    return Layout(root, challenges, tuple(files), roots, mtl_files, tuple(ignored), tuple(unused),
                  tuple(sorted(set(test_lists))))


def _test_lists_in(folder: Path) -> list[Path]:
    """Test-set lists directly in ``folder`` (recognised by name; see affpipe.index.testsets)."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if is_test_list_name(e.name) and e.is_file()]
    except OSError:
        return []


def _ignored_folder(path: Path, used: dict[str, Path]) -> Unused:
    task = CHALLENGE_DIRS[path.name][0]
    _, n = search_txt(path)
    return Unused(path, f"older-edition {task.upper()} folder ({n} .txt file(s) not read); "
                        f"{used[task].name} is used", n)
