"""Temporal context: the feature table (``affpipe embed``), sequence windows, temporal heads
(TCN, Transformer) trained like per-frame models, and per-video smoothing of predictions."""

from affpipe.temporal.features import FeatureTable, read_manifest, read_table
from affpipe.temporal.heads import TemporalModel, build_head, build_temporal_model
from affpipe.temporal.smoothing import moving_average
from affpipe.temporal.windows import WindowPlan, plan_windows

__all__ = [
    "FeatureTable", "TemporalModel", "WindowPlan", "build_head", "build_temporal_model", "moving_average",
    "plan_windows", "read_manifest", "read_table",
]
