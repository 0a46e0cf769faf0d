"""Training: models, task losses and metrics, the training loop, evaluation and predictions.

``config`` (frozen ``TrainConfig``), ``models`` (backbone + task heads), ``tasks`` (masked
losses), ``metrics`` (CCC, F1), ``checkpoint``, ``loop`` (``train``), ``evaluate``, ``predict``,
``plots``.
"""

from affpipe.train.config import TrainConfig, load_config
from affpipe.train.evaluate import evaluate
from affpipe.train.loop import train
from affpipe.train.predict import predict
from affpipe.train.runinfo import lineage_of_run

__all__ = ["TrainConfig", "evaluate", "lineage_of_run", "load_config", "predict", "train"]
