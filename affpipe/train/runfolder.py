"""The run folder's owner: every name ``train``, ``evaluate`` and the tuning steps write there."""

from __future__ import annotations

from affpipe.outdir import Owner

RUN_OWNER = Owner("train", (
    "config.json", "lineage.json", "metrics.jsonl", "last.pt", "best.pt", "step-*.pt", "curves.png",
    "eval*.json", "eval*.md", "eval*_predictions.*", "au_thresholds.json", "smoothing.json",
    "events.out.tfevents.*",
))
