"""The pictures of ``predict --video``: a track's plot over time and the annotated video.

``write_plot``: face thumbnails along the time axis, valence and arousal curves, the expression
probabilities stacked, and an AU heat strip (rows AU1…AU26, columns frames; frames without a
face stay blank). ``write_overlay``: the source video re-decoded, with each track's box, five
landmarks, current valence/arousal and top expression drawn (``cv2.VideoWriter``, MJPG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from affpipe.labels import AU_NAMES, EXPR_CLASSES

_THUMBS = 6
_COLORS = ((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193))


def write_plot(path: Path, name: str, t: pa.Table, crops: list[np.ndarray], crop_frames: np.ndarray) -> None:
    """``path`` (PNG): the four panels of one track (see the module docstring), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from affpipe.io import atomic_open

    d = t.to_pydict()
    frame = np.asarray(d["frame"], np.float64)
    nan = lambda k: np.array([np.nan if v is None else v for v in d[k]], np.float64)  # noqa: E731
    fig, axes = plt.subplots(4, 1, figsize=(10, 7.5), sharex=True,
                             gridspec_kw={"height_ratios": [1.2, 1.5, 1.2, 1.4]})
    lo, hi = (frame.min() - 0.5, frame.max() + 0.5) if len(frame) else (0, 1)
    ax = axes[0]
    ax.set_title(f"{name}: {int(sum(d['face']))} of {len(frame)} frames with a face")
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    if crops:
        for k in np.unique(np.linspace(0, len(crops) - 1, min(_THUMBS, len(crops))).round().astype(int)):
            w = (hi - lo) / (_THUMBS + 1) / 2
            ax.imshow(crops[k], extent=(crop_frames[k] - w, crop_frames[k] + w, 0.02, 0.98), aspect="auto")
    ax.set_xlim(lo, hi)
    ax = axes[1]
    for key, color in (("valence", "tab:blue"), ("arousal", "tab:red")):
        ax.plot(frame, nan(key), color=color, label=key, lw=1.2)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("VA")
    ax.legend(loc="upper right", fontsize=7)
    ax = axes[2]
    probs = np.stack([nan(f"p_{c}") for c in EXPR_CLASSES], 0)
    ax.stackplot(frame, np.nan_to_num(probs), labels=EXPR_CLASSES, step="mid")
    ax.set_ylim(0, 1)
    ax.set_ylabel("expression")
    ax.legend(loc="upper right", fontsize=6, ncol=4)
    ax = axes[3]
    au = np.stack([nan(f"p_{a}") for a in AU_NAMES], 0)
    ax.imshow(np.ma.masked_invalid(au), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
              extent=(lo, hi, len(AU_NAMES) - 0.5, -0.5))
    ax.set_yticks(range(len(AU_NAMES)), AU_NAMES, fontsize=6)
    ax.set_xlabel("frame")
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:  # no date or software version in the file: a rerun gives the same bytes
        fig.savefig(fh, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def write_overlay(path: Path, source: Path, crop_table: dict, tracks: dict[str, tuple[pa.Table, dict]]) -> None:
    """``path``: the video ``source`` with each track's face annotated (see the module docstring)."""
    import cv2

    from affpipe.video.sources import FrameInfo, Source, read_frames

    faces: dict[int, list[tuple[int, list, list]]] = {}
    for f, folder, box, lm in zip(crop_table["frame"], crop_table["folder"], crop_table["box"],
                                  crop_table["landmarks"], strict=True):
        if folder in tracks and box:
            faces.setdefault(f, []).append((list(tracks).index(folder), box, lm))
    rows = {name: {fr: i for i, fr in enumerate(t.column("frame").to_pylist())} for name, (t, _) in tracks.items()}
    cols = {name: t.to_pydict() for name, (t, _) in tracks.items()}
    names = list(tracks)
    cap = cv2.VideoCapture(str(source))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    cap.release()
    tmp = path.with_name(path.name.replace(".overlay.avi", ".tmp.overlay.avi"))  # a name the folder owns
    writer = None
    try:
        for f, _, img in read_frames(Source(source.stem, source, "video", (source,)), FrameInfo()):
            if img is None:
                continue
            if writer is None:
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, (img.shape[1], img.shape[0]))
                if not writer.isOpened():
                    raise ValueError(f"{path}: cv2.VideoWriter cannot write MJPG here")
            for k, box, lm in faces.get(f, []):
                color = _COLORS[k % len(_COLORS)]
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                cv2.rectangle(img, (x1, y1), (x2, y2), color, 2)
                for j in range(5):
                    cv2.circle(img, (int(round(lm[2 * j])), int(round(lm[2 * j + 1]))), 2, color, -1)
                c, i = cols[names[k]], rows[names[k]].get(f)
                if i is None:
                    continue
                text = [] if c["valence"][i] is None else [f"V {c['valence'][i]:+.2f} A {c['arousal'][i]:+.2f}"]
                text += [c["expr"][i]] if c["expr"][i] else []
                for line_no, s in enumerate(text):
                    cv2.putText(img, s, (x1, max(10, y1 - 4 - 12 * (len(text) - 1 - line_no))),
                                cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1, cv2.LINE_AA)
            writer.write(img)
    finally:
        if writer is not None:
            writer.release()
    if writer is None:
        tmp.unlink(missing_ok=True)
        return
    tmp.replace(path)
