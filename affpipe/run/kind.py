"""What a kind of run provides: the plug-in interface every kind implements.

A kind (per-frame: ``affpipe.train.frames``; temporal: ``affpipe.temporal.kind``) is an object
with the methods below; ``affpipe.runs.kinds`` registers them in one place and is the only code
that picks one (by the type of the config's data, or the ``kind`` a lineage records). Nothing
else branches on the kind of a run: the training loop, the run folder, ``open_run``,
``evaluate``, ``predict``, ``embed``, ``report`` and ``experiments`` ask the kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from affpipe.dist import DistContext
    from affpipe.loaders.base import LoaderConfig
    from affpipe.run.config import TrainConfig
    from affpipe.run.crops import CropModel


@dataclass
class OpenedData:
    """A run's data as ``open_run`` resolved and checked it: the paths that were read, the label
    index and table, and whatever the kind keeps to serve batches (``payload``)."""

    inputs: tuple[Path, ...]  # the shard folder, or the feature tables in fusion order
    index: Path
    table_name: str  # "frames" or "mtl": the label table the run was trained on
    label_table: pa.Table
    payload: Any = None

    @property
    def source(self) -> str:
        return ", ".join(map(str, self.inputs))


@dataclass(frozen=True)
class CropContext:
    """What a kind may need, beyond the checkpoint, to read face crops: the run's lineage (None
    for an export or a run without one), the data paths given by flag, and how to rebuild the
    frozen encoder a feature table was embedded with (``affpipe.runs.embed.table_encoder``: a
    feature table's folder → ``(encoder, EncoderSpec)``; the kinds sit below ``runs``)."""

    lineage: dict[str, Any] | None = None
    inputs: tuple[Path, ...] = ()
    encoder: Callable[[Path], tuple[Any, Any]] | None = None


@dataclass
class Setup:
    """What a kind sets up for training: the trainer (model, loss, optimizer), a factory of
    (train, val) loaders (called after resume and wrap), a description for the log, and the
    run's lineage (what it trains on, paths relative to the run folder)."""

    trainer: Any
    loaders: Callable[[], tuple[Any, Any]]
    what: str
    lineage: dict[str, Any]


class RunKind:
    """The interface of a kind of run (see the module docstring). Subclasses set ``name`` (what
    ``lineage.json`` records) and ``data_type`` (the config's data class they serve)."""

    name: str = ""
    title: str = ""  # what messages call a run of this kind ("per-frame", "temporal")
    data_type: type = object
    # Whether the state before the first step is a best.pt candidate (a temporal head starts at
    # its source run's predictions through the skip path).
    start_is_candidate: bool = False
    # The flag a user names this kind's data with (messages).
    data_flag: str = ""

    # ---- training ----------------------------------------------------------------------
    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` as this kind resolves it before training (what config.json records)."""
        return cfg

    def data_fingerprint(self, cfg: TrainConfig) -> str:
        """A fingerprint of the data ``cfg`` trains on (the run folder's marker records it)."""
        raise NotImplementedError

    def accepts_recorded(self, cfg: TrainConfig, recorded: str) -> bool:
        """Whether ``recorded`` (a run folder's marker) fingerprints ``cfg``'s data the way an
        older affpipe did (so its runs still resume)."""
        return False

    def setup(self, cfg: TrainConfig, ctx: DistContext, run: Path) -> Setup:
        """The trainer, loaders and lineage of a run of ``cfg`` in the folder ``run`` (the data's
        label table read once)."""
        raise NotImplementedError

    # ---- opening a finished run --------------------------------------------------------
    def open_data(self, ckpt: Path, cfg: TrainConfig, rec: dict[str, Any] | None, *,
                  inputs: tuple[Path, ...], index: Path | None, index_flag: bool) -> OpenedData:
        """Resolve and check the run's data (``inputs`` from flags, else its lineage, else its
        config) and read its label table once."""
        raise NotImplementedError

    def restore_model(self, cfg: TrainConfig, state: dict[str, Any], data: OpenedData | None,
                      source: str) -> torch.nn.Module:
        """The model a checkpoint holds, in eval mode on the CPU (weights that do not fit: one
        error naming ``source``)."""
        raise NotImplementedError

    def batches(self, cfg: TrainConfig, data: OpenedData, split: str, device: torch.device, *,
                batch_size: int | None = None, loader: LoaderConfig | None = None):
        """Unaugmented, unshuffled batches of every sample of ``split`` (what evaluation iterates)."""
        raise NotImplementedError

    def frame_encoder(self, cfg: TrainConfig, state: dict[str, Any], source: str) -> torch.nn.Module:
        """The model whose ``input_norm`` and ``backbone`` embed frames (``affpipe embed RUN``)."""
        raise ValueError(f"{source}: a {self.name} run has no frame encoder; embed the per-frame run its "
                         "features came from")

    def image_model(self, cfg: TrainConfig, state: dict[str, Any], source: str, ctx: CropContext) -> CropModel:
        """The ``affpipe.run.crops.CropModel`` that maps one face's uint8 crops, in time order, to
        raw outputs (what ``Run.predict`` and ``predict --video`` run); a kind that does not read
        images says so in one line."""
        raise ValueError(f"{source}: a {self.name} run does not predict from face crops; use a per-frame or "
                         "temporal run")

    def export_state(self, cfg: TrainConfig, state: dict[str, Any], source: str, ctx: CropContext) -> dict[str, Any]:
        """What ``affpipe export`` writes of a checkpoint's ``state`` (``model`` tensors, and
        ``encoders``: the specs of frozen encoders whose tensors it adds); the model alone by
        default."""
        return state

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        """What sets a run of this kind apart in a report (from its config.json)."""
        return {}
