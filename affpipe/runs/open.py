"""A run opened once: its checkpoint, config, kind, thresholds, smoothing and the data it reads.

``open_run(RUN_OR_CKPT, shards=, features=, index=)`` loads the checkpoint once, finds its kind
(``affpipe.runs.kinds``: from the config's data) and lets the kind resolve every input by one
rule (``affpipe.run.data.run_data_path``): a flag wins, else the path the run's lineage records
(relative to the run folder, so a run moved together with its data still opens, from any
working directory), else the config's path as typed (runs without a lineage). Data given by a
flag is checked against the fingerprints the run recorded (``affpipe.lineage.check``: one error
naming both sides). The kind rebuilds the model; the label table is read once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from affpipe import lineage
from affpipe.labels import AU_NAMES
from affpipe.loaders.base import LoaderConfig
from affpipe.run.config import TrainConfig
from affpipe.run.folder import RunFolder
from affpipe.run.kind import OpenedData, RunKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunInputs:
    """Which run to open and the flags that override the data it reads."""

    run: Path  # a run folder (its best.pt, else last.pt) or a checkpoint file
    shards: Path | None = None  # per-frame runs
    features: tuple[Path, ...] = ()  # temporal runs (one table today; a list for fused tables)
    index: Path | None = None  # the label index


@dataclass
class Run:
    """An opened run (see the module docstring). ``source`` names its data in messages."""

    ckpt: Path
    state: dict[str, Any]
    cfg: TrainConfig
    kind: RunKind
    data: OpenedData

    @property
    def folder(self) -> Path:
        """The folder the checkpoint sits in (the run folder; evaluate writes there)."""
        return self.ckpt.parent

    @property
    def files(self) -> RunFolder:
        return RunFolder(self.folder)

    @property
    def source(self) -> str:
        return self.data.source

    @property
    def index(self) -> Path:
        return self.data.index

    @property
    def table_name(self) -> str:
        return self.data.table_name

    @property
    def label_table(self) -> pa.Table:
        return self.data.label_table

    def model(self, device: torch.device) -> torch.nn.Module:
        """The checkpoint's model in eval mode on ``device``. It returns **raw outputs**, a dict:
        ``"va"`` ``[N,2]`` valence/arousal in [-1, 1] (already tanh), ``"expr"`` ``[N,8]`` and
        ``"au"`` ``[N,12]`` **logits** (``.softmax(-1)`` / ``.sigmoid()`` give probabilities; AU
        decisions: ``au_thresholds()`` or 0.5), for the heads the run has. A per-frame run takes
        images (uint8 or the loaders' normalized floats); a temporal run takes its window batches."""
        return self.kind.restore_model(self.cfg, self.state, self.data, str(self.ckpt)).to(device)

    def batches(self, split: str, device: torch.device, *, batch_size: int | None = None,
                loader: LoaderConfig | None = None):
        """Unaugmented, unshuffled batches of every sample of ``split`` (``loader`` overrides the
        run's own loader settings; the kind decides what a sample is: a frame, a window)."""
        return self.kind.batches(self.cfg, self.data, split, device, batch_size=batch_size, loader=loader)

    def au_thresholds(self) -> list[float] | None:
        """The AU thresholds ``evaluate --tune-au-thresholds`` stored in the run folder (None: 0.5)."""
        path = self.files.thresholds
        if "au" not in self.cfg.heads or not path.is_file():
            return None
        try:
            saved = self.files.read_thresholds()["au_thresholds"]
            values = [float(saved[name]) for name in AU_NAMES]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not an AU threshold file ({type(exc).__name__}: {exc})") from None
        log.info("using the tuned AU thresholds of %s", path)
        return values

    def split_rows(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row_id, video, frame, has_image) of ``split`` of the label table, in (video, frame) order."""
        import pyarrow.compute as pc

        from affpipe.io import safe_name

        table = self.label_table.filter(pc.equal(self.label_table.column("split"), split))
        table = table.sort_by([("video", "ascending"), ("frame", "ascending")])
        col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
        video = col("video").astype(object)
        for name in np.unique(video).tolist():  # names become file names: checked before any work
            safe_name(str(name), f"the label table of {self.index}: video")
        return col("row_id").astype(np.int64), video, col("frame").astype(np.int64), col("has_image").astype(bool)

    def frames_of(self, row_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(video, frame)`` of each of ``row_id`` (the rows a model predicted)."""
        from affpipe.index.build import row_positions

        try:
            pos = row_positions(self.label_table)(row_id)
        except KeyError as exc:
            raise ValueError(f"{self.source}: {exc.args[0]} predicted rows have a row_id the label table of "
                             f"{self.index} lacks: the data was not made from this index") from None
        video = self.label_table.column("video").to_numpy(zero_copy_only=False)[pos]
        return video.astype(object), self.label_table.column("frame").to_numpy()[pos].astype(np.int64)


def _flagged(path: Path | None, flag: str) -> Path | None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{flag} {path}: no such folder")
    return None if path is None else Path(path)


def open_run(inputs: RunInputs) -> Run:
    """Open ``inputs.run`` once (see the module docstring)."""
    from affpipe.run.checkpoint import load_checkpoint
    from affpipe.run.config import from_dict
    from affpipe.run.data import lineage_of_run, run_data_path
    from affpipe.run.folder import resolve_checkpoint
    from affpipe.runs.kinds import KINDS, kind_of

    ckpt = resolve_checkpoint(Path(inputs.run))
    state = load_checkpoint(ckpt, map_location="cpu")
    cfg = from_dict(state["config"], source=f"{ckpt} (config)")
    kind = kind_of(cfg)
    rec = state.get("lineage") if isinstance(state.get("lineage"), dict) else lineage_of_run(ckpt.parent)
    if rec is not None and rec.get("kind", kind.name) != kind.name:
        raise ValueError(f"{ckpt}: its lineage says a {rec.get('kind')} run, its config a {kind.name} run")
    given = {k.data_flag: tuple(_flagged(p, k.data_flag) for p in _given(inputs, k.data_flag)) for k in KINDS}
    for flag, paths in given.items():
        if paths and flag != kind.data_flag:
            raise ValueError(f"{flag}: {ckpt} is a {kind.name} run; pass {kind.data_flag} (or nothing)")
    index = _flagged(inputs.index, "--index")
    if index is not None and rec and rec.get("index_fingerprint"):  # refused before any data is read
        from affpipe.index.build import index_fingerprint

        lineage.check("label index", rec["index_fingerprint"], index_fingerprint(index, rec.get("table", "frames")),
                      f"{ckpt} (what it trained on)", f"{index}")
    index = run_data_path(ckpt.parent, (rec or {}).get("index"), index, cfg.index)
    data = kind.open_data(ckpt, cfg, rec, inputs=given[kind.data_flag], index=index,
                          index_flag=inputs.index is not None)
    return Run(ckpt, state, cfg, kind, data)


def _given(inputs: RunInputs, flag: str) -> tuple[Path, ...]:
    """The paths ``inputs`` gives for a kind's data flag (``--shards``, ``--features``)."""
    if flag == "--shards":
        return () if inputs.shards is None else (inputs.shards,)
    if flag == "--features":
        return tuple(inputs.features)
    return ()
