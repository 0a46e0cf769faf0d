"""Training: models, task losses and metrics, the training loop, evaluation and predictions.

``config`` (frozen ``TrainConfig``), ``models`` (backbone + task heads), ``tasks`` (masked
losses), ``metrics`` (CCC, F1), ``checkpoint``, ``loop`` (``train``), ``evaluate`` (the
validation pass and the one evaluation report), ``plots``. Evaluating and predicting a finished
run of any kind: ``affpipe.runs``.
"""

from affpipe.train.config import TrainConfig, load_config
from affpipe.train.loop import train
from affpipe.train.runinfo import lineage_of_run

__all__ = ["TrainConfig", "lineage_of_run", "load_config", "train"]
