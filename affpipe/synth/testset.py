"""The twin's test set: videos with crops and no annotation, and the edition's test-set files.

- ABAW1-2 named their test videos only in e-mails to the teams: no list is written, so an index
  of the twin exercises the "crops and no annotation" rule.
- ABAW3+: ``<annotations>/TestSet/names_of_videos_in_each_test_set/<Challenge>_test_set_release.txt``
  (one video name per line), a ``TestSet/`` folder beside the challenge folders.
- ABAW5+: also ``<annotations>/TestSet/CVPR_<n>th_ABAW_<VA|Expr|AU>_test_set_<sample|example>.txt``:
  the submission header, then ``video/00001.jpg,`` (trailing comma) for every frame of every
  test video of that challenge, as the releases have them.
- With ``--mtl`` (ABAW3+): ``<annotations>/TestSet/MTL_Challenge_test_set_release.txt``, a header
  and bare ``video/00001.jpg`` rows for a subset of the test frames with a crop (gaps).

Every draw comes from ``np.random.default_rng([seed, 2**31 + 2, ...])``: adding test videos leaves
the annotated videos' bytes unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from affpipe.io import atomic_write_text
from affpipe.labels import TASKS
from affpipe.synth.editions import HEADERS

TEST_DIR = "TestSet"
NAMES_DIR = "names_of_videos_in_each_test_set"
_CHALLENGE = {"va": "Valence_Arousal_Estimation_Challenge", "au": "Action_Unit_Detection_Challenge"}
_SAMPLE_TASK = {"va": "VA", "expr": "Expr", "au": "AU"}
_SAMPLE_HEADER = {"va": "image_location," + HEADERS["va"], "expr": "image_location," + HEADERS["expr8"],
                  "au": "image_location," + HEADERS["au"]}
MTL_TEST_HEADER = HEADERS["mtl"]


def test_video_names(seed: int, n: int, taken: set[str]) -> list[str]:
    """``n`` Aff-Wild2-like names not in ``taken``."""
    rng = np.random.default_rng([seed, 2**31 + 2, 0])
    out: list[str] = []
    while len(out) < n:
        name = f"{int(rng.integers(460, 999))}-{int(rng.choice([25, 30]))}-1280x720"
        if name not in taken and name not in out:
            out.append(name)
    return out


def test_membership(seed: int, n: int) -> np.ndarray:
    """``[n, 3]`` bool: which challenges' test lists name each test video (at least one), and
    every challenge's list names at least one video (a release's lists are never empty)."""
    rng = np.random.default_rng([seed, 2**31 + 2, 1])
    member = rng.random((n, len(TASKS))) < 0.7
    member[~member.any(1), 0] = True
    if n:
        for task in np.flatnonzero(~member.any(0)):
            member[int(task) % n, task] = True
    return member


def write_test_sets(edition_name: str, ann: Path, tests: list[tuple[str, int, tuple[str, ...], np.ndarray]],
                    expr_folder: str, seed: int, mtl: bool) -> dict:
    """Write the edition's test-set files; ``tests`` = (video, length, tasks, has_image [length]) per video."""
    number = int(edition_name.removeprefix("abaw"))
    if number < 3 or not tests:
        return {"videos": len(tests), "lists": []}
    folder = ann / TEST_DIR
    (folder / NAMES_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    challenge = {**_CHALLENGE, "expr": expr_folder.replace("EXPR_", "Expression_")}
    for task in TASKS:
        names = [v for v, _, tasks, _ in tests if task in tasks]
        path = folder / NAMES_DIR / f"{challenge[task]}_test_set_release.txt"
        atomic_write_text(path, "".join(f"{v}\n" for v in names))
        written.append(path)
        if number >= 5:
            kind = "sample" if number == 5 else "example"
            rows = "".join(f"{v}/{f:05d}.jpg,\n" for v, n, tasks, _ in tests if task in tasks for f in range(1, n + 1))
            path = folder / f"CVPR_{number}th_ABAW_{_SAMPLE_TASK[task]}_test_set_{kind}.txt"
            atomic_write_text(path, _SAMPLE_HEADER[task] + "\n" + rows)
            written.append(path)
    if mtl:
        rng = np.random.default_rng([seed, 2**31 + 2, 2])
        rows = []
        for v, _, _, has in tests:
            frames = np.flatnonzero(has) + 1
            rows += [f"{v}/{f:05d}.jpg\n" for f in frames[rng.random(len(frames)) < 0.3]]
        path = folder / "MTL_Challenge_test_set_release.txt"
        atomic_write_text(path, MTL_TEST_HEADER + "\n" + "".join(rows))
        written.append(path)
    return {"videos": len(tests), "lists": [str(p) for p in written]}
