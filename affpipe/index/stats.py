"""``affpipe stats``: a markdown summary of a label table and its label-distribution plots.

Plots show train and val side by side (expression classes, AU prevalence, a valence-arousal
2D histogram per split), each with axis labels, a title and the counts behind it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from affpipe.index.build import load_index
from affpipe.labels import AU_NAMES, EXPR_CLASSES, LABELLED_SPLITS, NUM_EXPR, SPLITS

log = logging.getLogger(__name__)


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def split_summary(table: pa.Table) -> dict[str, dict]:
    """Per split: frame, image and valid-label counts, class counts, AU positives, VA moments."""
    split = _col(table, "split")
    has = _col(table, "has_image")
    out = {}
    for s in SPLITS:
        m = split == s
        expr = _col(table, "expr")[m]
        ev = _col(table, "expr_valid")[m]
        au = np.stack([_col(table, a)[m] for a in AU_NAMES], axis=1) if m.any() else np.zeros((0, len(AU_NAMES)))
        va_ok = _col(table, "va_valid")[m]
        v, a = _col(table, "valence")[m][va_ok], _col(table, "arousal")[m][va_ok]
        out[s] = {
            "frames": int(m.sum()),
            "videos": len(set(_col(table, "video")[m].tolist())),
            "with_image": int(has[m].sum()),
            "va_valid": int(va_ok.sum()),
            "expr_valid": int(ev.sum()),
            "au_valid": int(_col(table, "au_valid")[m].sum()),
            "labelled_with_image": int((has[m] & (va_ok | ev | _col(table, "au_valid")[m])).sum()),
            "expr_counts": np.bincount(expr[ev].astype(np.int64), minlength=NUM_EXPR).tolist(),
            "au_pos": (au == 1).sum(axis=0).tolist(),
            "au_valid_per_au": (au >= 0).sum(axis=0).tolist(),
            "valence": v, "arousal": a,
        }
    return out


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "-"


def _plot_expr(s: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2, sharey=False)
    for ax, sp in zip(axes, LABELLED_SPLITS, strict=True):
        counts = s[sp]["expr_counts"]
        bars = ax.bar(range(NUM_EXPR), counts, color="tab:blue")
        ax.bar_label(bars, labels=[str(c) for c in counts], fontsize=8)
        ax.set_xticks(range(NUM_EXPR), EXPR_CLASSES, rotation=30, ha="right")
        ax.set_xlabel("expression class")
        ax.set_ylabel("frames (valid EXPR label)")
        ax.set_title(f"{sp}: {sum(counts)} frames")
        ax.margins(y=0.15)
    fig.suptitle("Expression class distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_au(s: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, sp in zip(axes, LABELLED_SPLITS, strict=True):
        pos, val = np.array(s[sp]["au_pos"]), np.array(s[sp]["au_valid_per_au"])
        prev = np.divide(pos, val, out=np.zeros(len(pos)), where=val > 0)
        bars = ax.bar(range(len(AU_NAMES)), prev, color="tab:orange")
        ax.bar_label(bars, labels=[str(int(p)) for p in pos], fontsize=7)
        ax.set_xticks(range(len(AU_NAMES)), AU_NAMES, rotation=45)
        ax.set_xlabel("action unit (bar label: positive frames)")
        ax.set_ylabel("prevalence (positives / valid)")
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{sp}: {s[sp]['au_valid']} frames with AU labels")
    fig.suptitle("AU prevalence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_va(s: dict, path: Path) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    bins = np.linspace(-1, 1, 41)
    for ax, sp in zip(axes, LABELLED_SPLITS, strict=True):
        v, a = s[sp]["valence"], s[sp]["arousal"]
        h, _, _ = np.histogram2d(v, a, bins=[bins, bins])
        im = ax.pcolormesh(bins, bins, h.T, norm=LogNorm(vmin=1, vmax=max(h.max(), 1)), cmap="viridis")
        fig.colorbar(im, ax=ax, label="frames per bin")
        ax.set_xlabel("valence")
        ax.set_ylabel("arousal")
        ax.set_aspect("equal")
        ax.set_title(f"{sp}: {len(v)} frames with valid VA")
    fig.suptitle("Valence-arousal 2D histogram")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _markdown(index: Path, meta: dict, s: dict, mtl: dict | None) -> str:
    c = meta.get("counts", {})
    lines = [f"# Label statistics — `{index}`", "",
             f"Image roots: {', '.join(f'`{r}`' for r in meta.get('image_roots', []))}", "",
             "| | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    for key, label in [("videos", "videos"), ("frames", "frames"), ("with_image", "with image"),
                       ("labelled_with_image", "labelled, with image"), ("va_valid", "VA valid"),
                       ("expr_valid", "EXPR valid"), ("au_valid", "AU valid")]:
        lines.append(f"| {label} | " + " | ".join(str(s[sp][key]) for sp in SPLITS) + " |")
    lines += ["", f"Missing images (a line, no image): {c.get('missing_images', '-')}; images without "
              f"any line: {c.get('images_without_line', '-')}; videos x tasks whose line count differs "
              f"from the image count: {c.get('line_image_mismatches', '-')}; split conflicts resolved: "
              f"{c.get('split_conflicts', '-')}; bad lines skipped: {c.get('bad_lines', 0)}.", ""]
    if "tasks" in c:
        lines += ["Annotation files per task (from `index.json`):", "",
                  "| task | split | files | lines | valid | valid, with image |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {t.upper()} | {sp} | {d['files']} | {d['lines']} | {d['valid']} | {d['valid_with_image']} |"
                  for t, by in c["tasks"].items() for sp, d in by.items() if sp != "test" or d["files"]]
        lines.append("")
    lines += ["## Expression classes", "", "![expression classes](expr_distribution.png)", "",
              "| class | " + " | ".join(LABELLED_SPLITS) + " |", "|---|" + "---:|" * len(LABELLED_SPLITS)]
    for k, name in enumerate(EXPR_CLASSES):
        lines.append(f"| {name} | " + " | ".join(
            f"{s[sp]['expr_counts'][k]} ({_pct(s[sp]['expr_counts'][k], s[sp]['expr_valid'])})" for sp in LABELLED_SPLITS) + " |")
    lines += ["", "## Action units (positives / valid)", "", "![AU prevalence](au_prevalence.png)", "",
              "| AU | " + " | ".join(LABELLED_SPLITS) + " |", "|---|" + "---:|" * len(LABELLED_SPLITS)]
    for k, name in enumerate(AU_NAMES):
        lines.append(f"| {name} | " + " | ".join(
            f"{s[sp]['au_pos'][k]} / {s[sp]['au_valid_per_au'][k]} ({_pct(s[sp]['au_pos'][k], s[sp]['au_valid_per_au'][k])})"
            for sp in LABELLED_SPLITS) + " |")
    lines += ["", "## Valence and arousal", "", "![valence-arousal](va_hist2d.png)", "",
              "| | " + " | ".join(LABELLED_SPLITS) + " |", "|---|" + "---:|" * len(LABELLED_SPLITS)]
    for dim in ("valence", "arousal"):
        for stat, fn in (("mean", np.mean), ("std", np.std)):
            lines.append(f"| {dim} {stat} | " + " | ".join(
                f"{fn(s[sp][dim]):.3f}" if len(s[sp][dim]) else "-" for sp in LABELLED_SPLITS) + " |")
    if mtl is not None:
        lines += ["", "## MTL subset (`mtl_frames.parquet`)", "",
                  "| | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
        for key in ("frames", "with_image", "va_valid", "expr_valid", "au_valid"):
            lines.append(f"| {key} | " + " | ".join(str(mtl[sp][key]) for sp in SPLITS) + " |")
    return "\n".join(lines + _test_section(c, s)) + "\n"


def _test_section(c: dict, s: dict) -> list[str]:
    """The test split: how it was made, its size, and what of the tree was not used."""
    t = c.get("test")
    lines = ["", "## Test split", "",
             f"{s['test']['videos']} videos, {s['test']['frames']} frames, {s['test']['with_image']} with an image "
             "(labels of test frames never reach a shard)."]
    if t:
        lines.append(f"Rule: {t['rule']}.")
        lines += [f"- list `{x['path']}`: {x['kind']}, {x['videos']} videos" for x in t["lists"]]
        for key in ("annotated_videos_made_test", "listed_videos_not_found", "unlisted_videos_without_annotation"):
            if t.get(key):
                lines.append(f"- {key.replace('_', ' ')}: {len(t[key])} ({', '.join(t[key][:8])})")
    unused = c.get("unused", [])
    cols = c.get("unused_columns", {})
    if unused or cols:
        lines += ["", "Not used from the tree:", ""]
        lines += [f"- column {k.split(':', 1)[1]} ({k.split(':', 1)[0].upper()}): {v['rows']} rows in {v['files']} files"
                  for k, v in cols.items()]
        lines += [f"- `{u['path']}`: {u['reason']}" for u in unused]
    return lines


def write_stats(index: Path, out: Path) -> Path:
    """Write ``stats.md`` and its PNGs for the index at ``index`` into ``out``; returns stats.md."""
    table, meta = load_index(index)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = split_summary(table)
    _plot_expr(s, out / "expr_distribution.png")
    _plot_au(s, out / "au_prevalence.png")
    _plot_va(s, out / "va_hist2d.png")
    mtl = None
    if (Path(index) / "mtl_frames.parquet").is_file():
        mtl = split_summary(load_index(index, table="mtl")[0])
    md = out / "stats.md"
    md.write_text(_markdown(Path(index), meta, s, mtl))
    log.info("wrote %s", md)
    return md
