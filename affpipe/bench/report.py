"""Turning benchmark results into the BENCHMARKS.md tables and the loaders bar chart."""

from __future__ import annotations

import os
from pathlib import Path

from affpipe.bench.common import NEEDS_DALI, NEEDS_GPU, fmt_rate, machine_line


def _ratio(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}×"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _status_or(row: dict, text: str) -> str:
    return text if row.get("status") == "ok" else row.get("status", "—")


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


def bench_markdown(results: dict, out: Path, md_dir: Path | None = None, chart: Path | None = None) -> str:
    """The ``bench`` section: machine, data, one table of loaders and training-step figures."""
    cfg, data, m = results["config"], results["data"], results["machine"]
    train = {r["name"]: r for r in results["train"]}
    cores = results.get("decode_limit", {}).get("cores") or m.get("cores")
    lines = [
        f"Measured {m['date']} on {machine_line(m)}. Training device: **{results['device']}**.",
        "",
        f"Data: synthetic Aff-Wild2 twin, {cfg['videos']} videos × {cfg['frames']} frames, "
        f"{data['train_samples']:,} train frames in shards; {cfg['image_size']} px. "
        f"Loaders: batch {cfg['batch_size']}, median of {cfg['repeats']} windows of ≤ {cfg['max_batches']} "
        f"batches or ≤ {cfg['seconds']} s after {cfg['warmup']} warm-up batches. Training step: ResNet-18 + "
        f"MultiTaskLoss, the trainer's AdamW step, batch {cfg['train_batch_size']}, windows of ≤ {cfg['train_max_steps']} steps or "
        f"≤ {cfg['train_seconds']} s. Whole run {results['wall_s']:.0f} s.",
        "",
        "Frames/s are steady-state: the benchmark's epochs are short, so the time spent starting each new "
        "epoch (new workers or pipeline, first batch) is taken out and shown on its own; the rates that "
        "include it are in results.json (`fps_with_epoch_starts`).",
        "",
        f"\"× of the limit\": frames/s over the decode limit, the one-thread decode ceiling × the {cores} usable "
        "cores — the most a CPU loader that decodes every frame can deliver here.",
        "",
        "| loader (augmented batches on the training device) | frames/s | × research | × of the limit | epoch start | train step frames/s | waiting for data |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["loaders"]:
        t = train.get(r["name"], {})
        fps = _status_or(r, fmt_rate(r["fps"]))
        # a loader that failed or needs a GPU says so once, in its own cell
        tfps = _status_or(t, fmt_rate(t.get("fps"))) if t and r.get("status") == "ok" else "—"
        wait = _pct(t.get("data_wait_share")) if t.get("status") == "ok" else "—"
        start = "—" if r.get("epoch_start_s") is None else f"{r['epoch_start_s']:.2f} s"
        lines.append(f"| {r['label']} | {fps} | {_ratio(r.get('ratio_vs_research'))} | {_ratio(r.get('ratio_vs_limit'), 2)} "
                     f"| {start} | {tfps} | {wait} |")
    d = results["decode_ceiling"]
    lines.append(f"| {d['label']} | {_status_or(d, fmt_rate(d['fps']))} | {_ratio(d.get('ratio_vs_research'))} "
                 f"| {_ratio(d.get('ratio_vs_limit'), 2)} | — | — | — |")
    lim = results.get("decode_limit", {})
    lines.append(f"| {lim.get('label', 'decode limit')} | {_status_or(lim, fmt_rate(lim.get('fps')))} | — | 1.00× | — | — | — |")
    s = train.get("synthetic", {})
    lines.append(f"| compute ceiling: training step on synthetic tensors | — | — | — | — | {_status_or(s, fmt_rate(s.get('fps')))} | 0% |")
    lines += conversion_lines(results.get("peer_conversions", {}))
    tgt = results["target"]
    met = ", ".join(tgt["met_by"]) if tgt["met_by"] else "no loader"
    lines.append("")
    if tgt.get("min_ratio"):
        met_min = ", ".join(tgt["min_met_by"]) if tgt["min_met_by"] else "no loader"
        lines.append(f"Floor: ≥ {tgt['min_ratio']:.0f}× the research's loader = {fmt_rate(tgt['min_fps'])} frames/s "
                     f"— met by: {met_min}.")
    lines.append(f"Aim: ≥ {tgt['ratio']:.0f}× the research's loader = {fmt_rate(tgt['fps'])} frames/s — met by: {met}.")
    for need in (NEEDS_GPU, NEEDS_DALI):
        missing = [r["label"] for r in results["loaders"] if r["status"] == need]
        if missing:
            lines.append(f"Not measured on this machine ({need}): {'; '.join(missing)}.")
    base = md_dir if md_dir is not None else Path.cwd()
    lines += ["", f"![frames/s per loader]({_rel(chart or Path(out) / 'loaders.png', base)})",
              f"Raw figures (every repeat): `{_rel(Path(out) / 'results.json', base)}`."]
    return "\n".join(lines)


def conversion_lines(conv: dict[str, dict]) -> list[str]:
    """One line on the peers' own formats: their conversion times, not in the frames/s above."""
    parts = []
    names = {"litdata": "LitData `optimize`", "ffcv": "FFCV `DatasetWriter`"}
    for name, c in conv.items():
        if c.get("status") != "ok":
            parts.append(f"{names.get(name, name)}: {c.get('status')}")
            continue
        note = " (re-encodes every frame as JPEG, quality 90)" if name == "ffcv" else " (keeps the JPEG bytes)"
        reused = ", converted by an earlier run" if c.get("reused") else ""
        parts.append(f"{names.get(name, name)} {c['convert_s']:.1f} s for {c['samples']:,} frames, "
                     f"{c['bytes'] / 1e6:.0f} MB{note}{reused}")
    return ["", "Conversions to the peers' own formats, timed apart (not in the figures above): " + "; ".join(parts) + "."] if parts else []


def loaders_chart(results: dict, png: Path) -> Path:
    """Horizontal bars of frames/s per loader, the decode ceiling, and the 8× target line."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure

    rows = [*results["loaders"], results["decode_ceiling"]]
    labels = [r["label"] for r in rows]
    values = [r["fps"] if r.get("status") == "ok" and r.get("fps") else 0.0 for r in rows]
    # wide enough for the longest row label beside a readable bar area
    fig = Figure(figsize=(max(10.0, 6.0 + 0.075 * max(map(len, labels))), 0.6 * len(rows) + 1.8), dpi=120)
    ax = fig.subplots()
    colors = ["#888888" if r["name"] == "research" else "#bbbbbb" if r["name"] == "decode-ceiling" else "#2b7bba" for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize=9)
    top = max([*values, results["target"]["fps"] or 0.0, 1.0])
    for yi, r, v in zip(y, rows, values, strict=True):
        text = f"{v:,.0f}" + (f"  ({r['ratio_vs_research']:.1f}×)" if r.get("ratio_vs_research") else "") if r.get("status") == "ok" else r.get("status", "")
        ax.text(v + top * 0.01, yi, text[:60], va="center", fontsize=8)
    if results["target"].get("min_fps"):
        ax.axvline(results["target"]["min_fps"], color="#ff7f0e", linestyle=":", linewidth=1.5)
        ax.text(results["target"]["min_fps"], len(rows) - 0.45, f" floor {results['target']['min_ratio']:.0f}×",
                color="#ff7f0e", fontsize=8, va="bottom")
    limit = results.get("decode_limit", {}).get("fps")
    if limit:
        ax.axvline(limit, color="#555555", linestyle="-.", linewidth=1.2)
        ax.text(limit, len(rows) - 0.45, " decode limit", color="#555555", fontsize=8, va="bottom")
        top = max(top, limit)
    if results["target"]["fps"]:
        ax.axvline(results["target"]["fps"], color="#d62728", linestyle="--", linewidth=1.5)
        ax.text(results["target"]["fps"], len(rows) - 0.45, f" aim {results['target']['ratio']:.0f}× research", color="#d62728", fontsize=8, va="bottom")
    ax.set_xlim(0, top * 1.3)
    ax.set_ylim(-0.6, len(rows) - 0.1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.set_xlabel("frames/s: augmented batches on the training device (decode ceiling: decode only)")
    m = results["machine"]
    ax.set_title(f"affpipe loaders — {m['cpu']}, {m['cores']} cores, GPU: {m.get('gpu') or 'none'}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png
