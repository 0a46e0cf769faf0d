"""``affpipe show``: a grid of random shard samples with their labels written on them.

Samples are read by random access through the ``.idx`` files (offset and size of each member),
so drawing a grid from shards of any size reads only the drawn samples.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from affpipe.labels import AU_NAMES, EXPR_CLASSES, FLAG_AU, FLAG_EXPR, FLAG_VA, decode_records
from affpipe.shards.format import manifest_index, parse_idx, read_manifest, shard_paths
from affpipe.shards.write import load_table

log = logging.getLogger(__name__)



def label_text(rec: np.void) -> str:
    """The labels of one decoded record as short lines: V/A, expression, active AUs."""
    flags = int(rec["flags"])
    lines = [f"#{int(rec['row_id'])}"]
    lines.append(f"V {rec['valence']:+.2f} A {rec['arousal']:+.2f}" if flags & FLAG_VA else "V/A -")
    lines.append(EXPR_CLASSES[int(rec["expr"])] if flags & FLAG_EXPR else "expr -")
    if flags & FLAG_AU:
        active = [name for name, v in zip(AU_NAMES, rec["au"], strict=True) if v == 1]
        lines.append("AU " + ",".join(a[2:] for a in active) if active else "no AU")
    else:
        lines.append("AU -")
    return "\n".join(lines)


def _frame_names(out: Path) -> dict[int, str]:
    """``row_id → "video/frame"`` from the manifest's index, or {} when it is not reachable."""
    manifest = read_manifest(out, full=False)
    try:
        tbl, _ = load_table(manifest_index(out, manifest), manifest.get("table", "frames"))
    except (FileNotFoundError, ValueError):
        return {}
    return {r: f"{v}/{f:05d}" for r, v, f in zip(tbl["row_id"].to_pylist(), tbl["video"].to_pylist(), tbl["frame"].to_pylist(), strict=True)}


def _sample_locations(out: Path, split: str | None) -> list[tuple[Path, dict]]:
    manifest = read_manifest(out, full=False)
    splits = [split] if split else list(manifest["splits"])
    locs = []
    for sp in splits:
        for tar, idx in shard_paths(out, sp):
            locs += [(tar, e) for e in parse_idx(idx)]
    return locs


def write_grid(out: Path, png: Path, *, n: int = 36, seed: int = 0, split: str | None = None) -> Path:
    """Draw ``n`` random samples (seeded) of ``split`` (all splits when None) into ``png``."""
    import cv2
    from matplotlib.figure import Figure

    if n < 1:
        raise ValueError(f"show: the number of samples must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"show: seed must be >= 0, got {seed}")
    locs = _sample_locations(Path(out), split)
    if not locs:
        raise ValueError(f"{Path(out) / 'manifest.json'}: no samples in split {split or 'any'}")
    names = _frame_names(Path(out))
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(locs), size=min(n, len(locs)), replace=False))
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(1.9 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks, strict=False):
        tar, entry = locs[i]
        with open(tar, "rb") as f:
            f.seek(entry["jpg"][0])
            jpg = f.read(entry["jpg"][1])
            f.seek(entry["lbl"][0])
            rec = decode_records(f.read(entry["lbl"][1]))[0]
        try:  # OpenCV raises on an empty buffer rather than returning None
            img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR) if jpg else None
        except cv2.error:
            img = None
        if img is None:  # drawn as a gap with its key: the grid is for looking, verify lists them all
            log.warning("%s: %s does not decode (%d bytes); `affpipe verify --decode` lists every such sample",
                        tar, entry["jpg"][2], len(jpg))
            ax.set_title(f"{entry['jpg'][2]}\nbad JPEG ({len(jpg)} bytes)", fontsize=7, loc="left")
            continue
        ax.imshow(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        title = label_text(rec)
        if (name := names.get(int(rec["row_id"]))) is not None:
            title = f"{name}\n{title}"
        ax.set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    log.info("wrote %s (%d samples)", png, len(picks))
    return png
