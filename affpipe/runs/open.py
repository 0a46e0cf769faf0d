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
from affpipe.run.crops import CropModel
from affpipe.run.folder import RunFolder
from affpipe.run.kind import CropContext, OpenedData, RunKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunInputs:
    """Which run to open and the flags that override the data it reads."""

    run: Path  # a run folder (its best.pt, else last.pt) or a checkpoint file
    shards: Path | None = None  # per-frame runs
    features: tuple[Path, ...] = ()  # temporal runs (one table today; a list for fused tables)
    index: Path | None = None  # the label index
    # Tuned state (au_thresholds.json, smoothing.json) applies only to the checkpoint it was tuned
    # on; naming that checkpoint here applies it to the one opened anyway (loudly).
    tuned_from: str | None = None


@dataclass
class Run:
    """An opened run (see the module docstring). ``source`` names its data in messages.

    ``data`` is None when opened with ``open_run(..., data=False)`` (predicting on images or
    videos needs the model alone) and for an exported file (``affpipe export``) without data
    flags; what reads the data then says so in one line."""

    ckpt: Path
    state: dict[str, Any]
    cfg: TrainConfig
    kind: RunKind
    _data: OpenedData | None

    @property
    def data(self) -> OpenedData:
        if self._data is None:
            raise ValueError(f"{self.ckpt}: opened without its data (an exported model, or open_run(data=False)); "
                             f"it predicts on images and videos only (pass {self.kind.data_flag} for the rest)")
        return self._data

    @property
    def exported(self) -> bool:
        """Whether the model comes from an ``affpipe export`` file (not a run folder)."""
        return "export" in self.state
    tuned_from: str | None = None  # RunInputs.tuned_from

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
        """The AU thresholds ``evaluate --tune-au-thresholds`` stored in the run folder, or the
        ones an exported file carries (None: 0.5); a run folder's only when they were tuned on this
        checkpoint (:meth:`check_tuned`)."""
        if "au" not in self.cfg.heads:
            return None
        if self.exported:
            record = {"au_thresholds": self.state.get("au_thresholds")}
            path = self.ckpt
            if record["au_thresholds"] is None:
                return None
        else:
            path = self.files.thresholds
            if not path.is_file():
                return None
            record = self.files.read_thresholds()
        try:
            saved = record["au_thresholds"]
            values = [float(saved[name]) for name in AU_NAMES]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not an AU threshold file ({type(exc).__name__}: {exc})") from None
        if not self.exported:  # an export carries the thresholds of the checkpoint it was made from
            self.check_tuned(record, path)
        log.info("using the tuned AU thresholds of %s", path)
        return values

    def smoothing_windows(self) -> dict[str, int]:
        """The windows of the run's ``smoothing.json`` (or the ones an export carries)."""
        from affpipe.temporal.smoothing import load_windows

        if self.exported:
            if not self.state.get("smoothing"):
                raise ValueError(f"--smooth: {self.ckpt} was exported without smoothing windows "
                                 "(tune them with `affpipe evaluate RUN --tune-smoothing`, then export again)")
            return {str(t): int(w) for t, w in self.state["smoothing"].items()}
        self.check_tuned(self.files.read_smoothing(), self.files.smoothing)  # tuned on this checkpoint
        return load_windows(self.folder)

    def crop_context(self, features: tuple[Path, ...] = ()) -> CropContext:
        """What the kind may need to read crops beyond the checkpoint (``features``: tables given
        by flag, in place of the ones the lineage records)."""
        from affpipe.run.data import lineage_of_run
        from affpipe.runs.embed import table_encoder

        rec = None if self.exported else lineage_of_run(self.folder)
        return CropContext(lineage=rec, inputs=tuple(Path(f) for f in features), encoder=table_encoder)

    def image_model(self, device: torch.device, *, features: tuple[Path, ...] = ()) -> CropModel:
        """The model that reads one face's uint8 crops in time order (the kind's; a kind without
        one: one error): a per-frame run's network, or a temporal run's frozen encoders and head."""
        return self.kind.image_model(self.cfg, self.state, str(self.ckpt), self.crop_context(features)).to(device)

    def predict(self, images, frames=None, *, device: str = "auto", batch_size: int = 64,
                model: CropModel | None = None) -> dict[str, np.ndarray]:
        """The model's outputs on aligned face crops: ``images`` uint8 ``[N, 112, 112, 3]`` RGB (or a
        list of ``[112, 112, 3]``), the crops of **one face in time order**; ``frames``: their
        frame numbers (default ``0..N-1``; a frame without a crop is left out, a gap). Returns numpy
        arrays: ``valence``, ``arousal`` ``[N]``, ``expr_probs [N, 8]`` (softmax), ``au_probs [N,
        12]`` (sigmoid), for the heads the run has. A per-frame run reads each crop alone (resized
        to its image size as its loaders do); a temporal run embeds every crop with the encoders of
        its feature tables and averages its windows over the frames, as ``evaluate`` does."""
        from affpipe.dist import pick_device
        from affpipe.run.crops import check_frames

        arr = images if isinstance(images, np.ndarray) else np.stack([np.asarray(i) for i in images]) \
            if len(images) else np.zeros((0, 112, 112, 3), np.uint8)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"predict: images must be uint8 [N, H, W, 3] RGB crops, got {arr.dtype} {list(arr.shape)}")
        frames = check_frames(frames, len(arr))
        dev = pick_device(device)
        model = model if model is not None else self.image_model(dev)
        outs = model.outputs(arr, frames, batch_size=batch_size, device=dev) if len(arr) else {}
        bad = np.zeros(len(arr), bool)
        for v in outs.values():
            bad |= ~np.isfinite(v).all(1)
        if bad.any():  # never a NaN written as a prediction
            raise ValueError(f"{self.ckpt}: {int(bad.sum())} of {len(arr)} crops gave NaN or infinite outputs (first: "
                             f"crop {int(np.flatnonzero(bad)[0])}, frame {int(frames[bad][0])}); the weights hold NaN?")
        return _probabilities({t: [v] for t, v in outs.items()}, self.cfg.heads, len(arr))

    def check_tuned(self, record: dict[str, Any], path: Path) -> str:
        """Refuse tuned state (``record``, read from ``path``) tuned on another checkpoint than
        this one (its name, or the step it then held), unless ``tuned_from`` names that one;
        returns where it was tuned, as ``best.pt (step N, split val)``."""
        tuned_on, step = record.get("checkpoint"), record.get("step")
        at = f"step {step}, " if step is not None else ""
        where = f"{tuned_on or 'an unnamed checkpoint'} ({at}split {record.get('split', '?')})"
        here = int(self.state.get("step", -1))
        same = tuned_on == self.ckpt.name and (step is None or int(step) == here)
        if same:
            return where
        if self.tuned_from is not None and self.tuned_from == tuned_on:
            log.warning("%s was tuned on %s; applying it to %s (step %d) as --tuned-from %s asks", path, where,
                        self.ckpt.name, here, tuned_on)
            return where
        hint = f"--tuned-from {tuned_on}" if tuned_on else "--tuned-from <checkpoint>"
        raise ValueError(f"{path} was tuned on {where}, not on {self.ckpt.name} (step {here}): tune it again on "
                         f"{self.ckpt.name}, or pass {hint} to apply it anyway")

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


def _probabilities(outs: dict[str, list[np.ndarray]], heads, n: int) -> dict[str, np.ndarray]:
    """Raw outputs → VA, softmax EXPR and sigmoid AU probabilities (float32)."""
    from affpipe.labels import NUM_AU, NUM_EXPR

    cat = {t: np.concatenate(v) if v else None for t, v in outs.items()}
    res: dict[str, np.ndarray] = {}
    if "va" in heads:
        va = cat.get("va") if cat.get("va") is not None else np.zeros((n, 2), np.float32)
        res["valence"], res["arousal"] = va[:, 0].astype(np.float32), va[:, 1].astype(np.float32)
    if "expr" in heads:
        z = cat.get("expr") if cat.get("expr") is not None else np.zeros((n, NUM_EXPR), np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        res["expr_probs"] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    if "au" in heads:
        z = cat.get("au") if cat.get("au") is not None else np.zeros((n, NUM_AU), np.float32)
        res["au_probs"] = (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)
    return res


def _flagged(path: Path | None, flag: str) -> Path | None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{flag} {path}: no such folder")
    return None if path is None else Path(path)


def open_run(inputs: RunInputs, *, data: bool = True) -> Run:
    """Open ``inputs.run`` once (see the module docstring): a run folder, a checkpoint, or a file
    ``affpipe export`` wrote. ``data=False``: the model alone (no shards or features read), for
    predicting on images and videos; an export without data flags opens that way too."""
    from affpipe.run.checkpoint import load_checkpoint
    from affpipe.run.config import from_dict
    from affpipe.run.data import lineage_of_run, run_data_path
    from affpipe.run.exported import is_export, read_export
    from affpipe.run.folder import resolve_checkpoint
    from affpipe.runs.kinds import KINDS, kind_of

    ckpt = resolve_checkpoint(Path(inputs.run))
    exported = is_export(ckpt)
    state = read_export(ckpt) if exported else load_checkpoint(ckpt, map_location="cpu")
    cfg = from_dict(state["config"], source=f"{ckpt} (config)")
    kind = kind_of(cfg)
    if exported and not (inputs.shards or inputs.features or inputs.index):
        data = False  # an export carries no data paths of its own: the model alone
    if not data:
        return Run(ckpt, state, cfg, kind, None, tuned_from=inputs.tuned_from)
    rec = (state.get("lineage") if isinstance(state.get("lineage"), dict)
           else None if exported else lineage_of_run(ckpt.parent))
    if rec is not None and rec.get("kind", kind.name) != kind.name:
        raise ValueError(f"{ckpt}: its lineage says a {rec.get('kind')} run, its config a {kind.name} run")
    given = {k.data_flag: tuple(_flagged(p, k.data_flag) for p in _given(inputs, k.data_flag)) for k in KINDS}
    for flag, paths in given.items():
        if paths and flag != kind.data_flag:
            raise ValueError(f"{flag}: {ckpt} is a {kind.title} run; pass {kind.data_flag} (or nothing)")
    index = _flagged(inputs.index, "--index")
    if index is not None and rec and rec.get("index_fingerprint"):  # refused before any data is read
        from affpipe.index.build import index_fingerprint

        lineage.check("label index", rec["index_fingerprint"], index_fingerprint(index, rec.get("table", "frames")),
                      f"{ckpt} (what it trained on)", f"{index}")
    index = run_data_path(ckpt.parent, (rec or {}).get("index"), index, cfg.index)
    opened = kind.open_data(ckpt, cfg, rec, inputs=given[kind.data_flag], index=index,
                            index_flag=inputs.index is not None)
    return Run(ckpt, state, cfg, kind, opened, tuned_from=inputs.tuned_from)


def _given(inputs: RunInputs, flag: str) -> tuple[Path, ...]:
    """The paths ``inputs`` gives for a kind's data flag (``--shards``, ``--features``)."""
    if flag == "--shards":
        return () if inputs.shards is None else (inputs.shards,)
    if flag == "--features":
        return tuple(inputs.features)
    return ()
