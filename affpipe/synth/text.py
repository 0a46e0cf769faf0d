"""The twin's annotation text: per-video task files in an edition's header and folder layout.

Lines come from lookup tables (one string per value), which is what makes writing
~2.9M lines fast enough for the full-scale twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from affpipe.io import atomic_write_bytes
from affpipe.labels import AU_NAMES, NUM_AU
from affpipe.synth.config import VideoPlan
from affpipe.synth.editions import HEADERS, Edition

_VA_TAB = np.array([str(k / 1000) for k in range(-1000, 1001)] + ["-5"], dtype=object)
_AU_TAB = np.array([",".join(str((c >> (NUM_AU - 1 - b)) & 1) for b in range(NUM_AU)) for c in range(2**NUM_AU)]
                   + [",".join(["-1"] * NUM_AU)], dtype=object)
_AU_BITS = (1 << np.arange(NUM_AU - 1, -1, -1)).astype(np.int64)
_EXPR_TAB = np.array([str(k) for k in range(8)] + ["-1"], dtype=object)


def _va_text(v: np.ndarray, a: np.ndarray) -> list[str]:
    iv = np.where(np.isnan(v), 2001, np.rint(np.nan_to_num(v) * 1000) + 1000).astype(np.int64)
    ia = np.where(np.isnan(a), 2001, np.rint(np.nan_to_num(a) * 1000) + 1000).astype(np.int64)
    return [x + "," + y for x, y in zip(_VA_TAB[iv].tolist(), _VA_TAB[ia].tolist(), strict=True)]


def _expr_text(e: np.ndarray) -> list[str]:
    return _EXPR_TAB[np.where(e < 0, 8, e)].tolist()


def _au_text(au: np.ndarray) -> list[str]:
    code = np.where((au < 0).any(1), 2**NUM_AU, au.astype(np.int64).clip(0) @ _AU_BITS)
    return _AU_TAB[code].tolist()



def _write_file(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _task_files(ann: Path, layout: Edition, plan: VideoPlan) -> dict[str, Path]:
    dirs = dict(zip(("train", "val"), layout.split_dirs, strict=True))
    return {t: ann / layout.folders[t] / dirs[s] / f"{plan.name}.txt" for t, s in plan.tasks.items()}


def _write_annotations(files: dict[str, Path], fr: dict[str, np.ndarray], lines: int, layout: Edition) -> None:
    sl = slice(0, lines)
    for task, path in files.items():
        if task == "va":
            head, body = HEADERS["va"], _va_text(fr["valence"][sl], fr["arousal"][sl])
        elif task == "expr":
            head, body = HEADERS[f"expr{layout.expr_classes}"], _expr_text(fr["expr"][sl])
        elif layout.au_names == AU_NAMES:
            head, body = HEADERS["au"], _au_text(np.stack([fr[a][sl] for a in AU_NAMES], 1))
        else:
            head, body = ",".join(layout.au_names), _au_text_by_name(fr, sl, layout.au_names)
        _write_file(path, head + "\n" + "\n".join(body) + "\n")


def _au_text_by_name(fr: dict[str, np.ndarray], sl: slice, names: tuple[str, ...]) -> list[str]:
    """AU lines for a header other than the 12 (ABAW1): an AU outside the 12 (AU20) is 0 on a
    valid row, -1 on an invalid one (its value is not part of the truth)."""
    valid = fr["AU1"][sl] >= 0
    cols = [fr[a][sl] if a in AU_NAMES else np.where(valid, 0, -1) for a in names]
    return [",".join(map(str, row)) for row in np.stack(cols, 1).tolist()]
