"""The research's way of indexing, kept as the baseline for the index benchmark.

``naive_index`` reads every annotation line in a Python loop and asks ``os.path.exists`` for
every frame's image, as the research's Dataset did; ``compare_index`` times it against
:func:`affpipe.index.build_index` on the same tree and checks both found the same labels.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from affpipe.index.layout import find_layout
from affpipe.labels import AU_NAMES, EXPR_CLASSES, NUM_AU


def naive_index(root: Path, images: tuple[Path, ...] = ()) -> pa.Table:
    """Per-line Python parsing + per-frame ``os.path.exists``: one row per annotated frame.

    Columns ``video``, ``frame``, ``has_image``, ``valence``, ``arousal``, ``expr`` and the
    AUs (images without any line are not listed, as in the research's code). Headers are
    mapped by name and invalid markers turned into NaN/-1 like the real index, so the label
    values can be compared; malformed lines raise ``ValueError`` without a line number.
    """
    layout = find_layout(Path(root), images)
    rows: dict[tuple[str, int], dict] = {}
    for f in layout.files:
        with open(f.path, encoding="utf-8") as fh:
            header = [h.strip().lower() for h in fh.readline().lstrip("\ufeff").split(",")]
            for i, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                row = rows.setdefault((f.video, i), {"valence": math.nan, "arousal": math.nan,
                                                     "expr": -1, **{a: -1 for a in AU_NAMES}})
                vals = [float(x) for x in line.split(",")]
                if f.task == "va":
                    d = dict(zip(header, vals, strict=False))
                    if d["valence"] != -5 and d["arousal"] != -5:
                        row["valence"], row["arousal"] = d["valence"], d["arousal"]
                elif f.task == "expr":
                    k = int(vals[0])
                    row["expr"] = -1 if k < 0 else [c.lower() for c in EXPR_CLASSES].index(header[k])
                else:
                    for name, v in zip(header, vals, strict=False):
                        row[AU_NAMES[[a.lower() for a in AU_NAMES].index(name)]] = int(v)
    out: dict[str, list] = {"video": [], "frame": [], "has_image": [], "valence": [], "arousal": [],
                            "expr": [], **{a: [] for a in AU_NAMES}}
    for (video, frame), row in sorted(rows.items()):
        name = f"{frame:05d}.jpg"
        out["video"].append(video)
        out["frame"].append(frame)
        out["has_image"].append(any(os.path.exists(os.path.join(r, video, name)) for r in layout.image_roots))
        for k, v in row.items():
            out[k].append(v)
    return pa.table({k: pa.array(v, type=pa.int8() if k == "expr" or k in AU_NAMES else None)
                     for k, v in out.items()})


def compare_index(root: Path, workers: int = 2) -> dict:
    """Time :func:`naive_index` against :func:`build_index` on ``root``; check they agree."""
    from affpipe.index.build import IndexConfig, build_index, load_index

    t0 = time.perf_counter()
    naive = naive_index(root)
    t_naive = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_index(IndexConfig(root=Path(root), out=Path(tmp), workers=workers))
        t_fast = time.perf_counter() - t0
        table, _ = load_index(Path(tmp))
    # the naive table lists annotated frames only: compare on those
    annotated = np.zeros(table.num_rows, bool)
    keys = {(v, f) for v, f in zip(naive.column("video").to_pylist(), naive.column("frame").to_pylist(), strict=False)}
    for i, (v, f) in enumerate(zip(table.column("video").to_pylist(), table.column("frame").to_pylist(), strict=False)):
        annotated[i] = (v, f) in keys
    sub = table.filter(pa.array(annotated))
    same = sub.num_rows == naive.num_rows and all(
        np.array_equal(sub.column(c).to_numpy(), naive.column(c).to_numpy().astype(sub.column(c).type.to_pandas_dtype()),
                       equal_nan=c in ("valence", "arousal"))
        for c in ("frame", "has_image", "valence", "arousal", "expr", *AU_NAMES[:NUM_AU])
    )
    return {"frames": table.num_rows, "naive_s": round(t_naive, 3), "fast_s": round(t_fast, 3),
            "speedup": round(t_naive / t_fast, 2) if t_fast else None, "agree": bool(same)}
