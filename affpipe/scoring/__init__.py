"""Losses and statistics: each task's masked loss (``tasks``), CCC and F1 (``metrics``), and
95% intervals by bootstrap over videos with paired comparisons (``bootstrap``)."""

from affpipe.scoring.metrics import MetricAccumulator
from affpipe.scoring.tasks import LossConfig, MultiTaskLoss

__all__ = ["LossConfig", "MetricAccumulator", "MultiTaskLoss"]
