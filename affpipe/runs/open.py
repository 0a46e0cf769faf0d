"""A run opened once: its checkpoint, config, kind, thresholds, smoothing and the data it reads.

``open_run(RUN_OR_CKPT, shards=, features=, index=)`` loads the checkpoint once and resolves
every input of a per-frame run (shards) or a temporal run (feature tables) by one rule: a flag
wins, else the path the run's lineage records (relative to the run folder, so a run moved
together with its data still opens, from any working directory), else the config's path as
typed (runs without a lineage). Data given by a flag is checked against the fingerprints the run
recorded (``affpipe.lineage.check``: one error naming both sides). The model is rebuilt from the
checkpoint in one place (``affpipe.temporal.heads.restore_model``), the label table is read once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
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
from affpipe.train.evaluate import THRESHOLDS_FILE

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
    kind: str  # "frames" | "temporal"
    shards: Path | None
    features: tuple[Path, ...]
    index: Path
    table_name: str  # "frames" or "mtl": the label table the run was trained on
    label_table: pa.Table
    temporal: Any = None  # affpipe.temporal.train.TemporalData for a temporal run

    @property
    def folder(self) -> Path:
        """The folder the checkpoint sits in (the run folder; evaluate writes there)."""
        return self.ckpt.parent

    @property
    def source(self) -> str:
        return str(self.shards) if self.kind == "frames" else ", ".join(map(str, self.features))

    def model(self, device: torch.device) -> torch.nn.Module:
        """The checkpoint's model in eval mode on ``device``."""
        from affpipe.temporal.heads import restore_model

        dim = self.temporal.table.dim if self.temporal is not None else None
        return restore_model(self.cfg, self.state, feature_dim=dim, source=str(self.ckpt)).to(device)

    def batches(self, split: str, device: torch.device, *, batch_size: int | None = None,
                loader: LoaderConfig | None = None):
        """Unaugmented, unshuffled batches of every sample of ``split`` (``loader`` overrides the
        run's own loader settings; a temporal run reads windows of its feature table)."""
        if self.temporal is not None:
            return self.temporal.loader(split, self.cfg, train=False, device=device, batch_size=batch_size)
        from affpipe.loaders import make_loader

        settings = loader if loader is not None else self.cfg.loader
        return make_loader(self.shards, split, batch_size=batch_size or self.cfg.batch_size, train=False,
                           device=device, image_size=self.cfg.image_size, seed=self.cfg.seed, rank=0, world_size=1,
                           normalize=False, **settings.kwargs(train=False))

    def au_thresholds(self) -> list[float] | None:
        """The AU thresholds ``evaluate --tune-au-thresholds`` stored in the run folder (None: 0.5)."""
        path = self.folder / THRESHOLDS_FILE
        if "au" not in self.cfg.heads or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())["au_thresholds"]
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


def _recorded(run_dir: Path, rec: dict | None, key: str) -> Any:
    """A path the run's lineage records (relative to the run folder), or a list of them."""
    value = (rec or {}).get(key)
    if value is None:
        return None
    if isinstance(value, list):
        return [lineage.resolve_path(run_dir, v) for v in value]
    return lineage.resolve_path(run_dir, value)


def _existing(path: Path | None, what: str, ckpt: Path, flag: str) -> Path:
    if path is None:
        raise ValueError(f"{ckpt}: no {what} recorded for this run; pass {flag}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{ckpt}: its {what} {path} is not there (moved?); pass {flag} to point at it")
    return Path(path)


def open_run(inputs: RunInputs) -> Run:
    """Open ``inputs.run`` once (see the module docstring)."""
    from affpipe.run.checkpoint import load_checkpoint, resolve_checkpoint
    from affpipe.run.config import from_dict
    from affpipe.run.data import lineage_of_run

    ckpt = resolve_checkpoint(Path(inputs.run))
    state = load_checkpoint(ckpt, map_location="cpu")
    cfg = from_dict(state["config"], source=f"{ckpt} (config)")
    kind = "temporal" if cfg.is_temporal else "frames"
    rec = state.get("lineage") if isinstance(state.get("lineage"), dict) else lineage_of_run(ckpt.parent)
    if rec is not None and rec.get("kind", kind) != kind:
        raise ValueError(f"{ckpt}: its lineage says a {rec.get('kind')} run, its config a {kind} run")
    shards, index = _flagged(inputs.shards, "--shards"), _flagged(inputs.index, "--index")
    features = tuple(_flagged(f, "--features") for f in inputs.features)
    if kind == "frames" and features:
        raise ValueError(f"--features: {ckpt} is a per-frame model trained on shards; pass --shards (or nothing)")
    if kind == "temporal" and shards is not None:
        raise ValueError(f"--shards: {ckpt} is a temporal head over a feature table; pass --features (or nothing)")
    if index is not None:  # another label table than the run's is refused before any data is read
        _check_index(rec, index, (rec or {}).get("table", "frames"), ckpt)
    index = index or _recorded(ckpt.parent, rec, "index") or (Path(cfg.index) if cfg.index else None)
    if kind == "frames":
        shards = _existing(shards or _recorded(ckpt.parent, rec, "shards") or cfg.shards, "shards", ckpt, "--shards")
        return _open_frames(ckpt, state, cfg, rec, shards, index, override=inputs.index is not None)
    feats = features or tuple(_recorded(ckpt.parent, rec, "features") or list(cfg.feature_tables))
    if not feats:
        raise ValueError(f"{ckpt}: no feature table recorded for this run; pass --features")
    feats = tuple(_existing(f, "feature table", ckpt, "--features") for f in feats)
    return _open_temporal(ckpt, state, cfg, rec, feats, index, override=inputs.index is not None)


def _check_index(rec: dict | None, index: Path, table_name: str, ckpt: Path) -> None:
    from affpipe.index.build import index_fingerprint

    if rec and rec.get("index_fingerprint"):
        lineage.check("label index", rec["index_fingerprint"], index_fingerprint(index, table_name),
                      f"{ckpt} (what it trained on)", f"{index}")


def _open_frames(ckpt: Path, state: dict, cfg: TrainConfig, rec: dict | None, shards: Path, index: Path | None,
                 *, override: bool) -> Run:
    from affpipe.index.build import load_index
    from affpipe.shards.format import checked_index, read_manifest

    manifest = read_manifest(shards, full=False)
    # Other shards of the same label table (another sharding, the test split) are fine: what must
    # agree is the table the row ids refer to.
    lineage.check("label index", (rec or {}).get("index_fingerprint"), manifest.get("index_fingerprint"),
                  f"{ckpt} (what it trained on)", f"{shards}")
    # An index the run recorded but that is gone falls back to the one the shards name.
    if index is not None and not override and not Path(index).exists():
        index = None
    index = checked_index(shards, manifest, index)
    table_name = manifest.get("table", "frames")
    if not override:  # a flag's index was checked already
        _check_index(rec, index, table_name, ckpt)
    table, _ = load_index(index, table=table_name)
    return Run(ckpt, state, cfg, "frames", shards, (), index, table_name, table)


def _open_temporal(ckpt: Path, state: dict, cfg: TrainConfig, rec: dict | None, features: Sequence[Path],
                   index: Path | None, *, override: bool) -> Run:
    from affpipe.temporal.features import features_fingerprint
    from affpipe.temporal.train import TemporalData

    if len(features) != len(cfg.feature_tables):
        raise ValueError(f"--features: {ckpt} reads {len(cfg.feature_tables)} feature table(s) (fused in that "
                         f"order), {len(features)} given")
    if index is not None and not Path(index).exists():
        index = None  # the recorded one is gone: the feature table names its own
    data = TemporalData.open(features, index)
    fused = data.table.manifest.get("fused")  # one entry per table, in order
    actual = [e["fingerprint"] for e in fused] if fused else [features_fingerprint(data.table.manifest)]
    for i, (fp, f, now) in enumerate(zip((rec or {}).get("features_fingerprint") or [], features, actual, strict=False)):
        lineage.check(f"feature table #{i + 1}", fp, now, f"{ckpt} (what it trained on)", str(f))
    table_name = data.table.manifest.get("table", "frames")
    if not override:  # a flag's index was checked already
        _check_index(rec, data.index, table_name, ckpt)
    return Run(ckpt, state, cfg, "temporal", None, tuple(features), data.index, table_name, data.label_table, data)
