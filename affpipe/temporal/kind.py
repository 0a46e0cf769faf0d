"""The temporal kind of run: feature tables → windows → a temporal head (``affpipe.run.kind.RunKind``).

A temporal run trains with the per-frame run's machinery unchanged (``Trainer``, ``fit``, the
masked multi-task loss, metrics, checkpoints, resume, ``metrics.jsonl``, ``eval.json``); what is
its own is here: the data (``FeaturesData``: one feature table or several fused, and the head's
options), its lineage and fingerprint, the model over feature windows, and window batches for
evaluation. The feature tables' manifests name the label index, so the features are the only input.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from affpipe import dist, lineage
from affpipe.loaders.base import LoaderConfig
from affpipe.run.config import FeaturesData, TrainConfig
from affpipe.run.crops import CropModel, EncoderSpec
from affpipe.run.data import index_fingerprint_of, lineage_record, run_data_paths
from affpipe.run.kind import CropContext, OpenedData, RunKind, Setup
from affpipe.temporal.data import TemporalData
from affpipe.temporal.features import FeatureTable, source_checkpoint
from affpipe.temporal.heads import TemporalModel, build_temporal_model, load_frame_heads

log = logging.getLogger(__name__)

ENCODERS = "encoders."  # an export's encoder tensors: encoders.<k>.<name>


def build_model_for(cfg: TrainConfig, dim: int, table: FeatureTable | None = None) -> TemporalModel:
    """The temporal model of ``cfg`` over features of width ``dim``; with ``table`` (the feature
    table) and ``init_frame_heads``, its skip path starts from the source checkpoint's heads (when
    the table was embedded from an affpipe run: a weight file or ImageNet has none)."""
    from affpipe.run.checkpoint import load_checkpoint

    tc = cfg.data.temporal
    torch.manual_seed(cfg.seed)
    model = build_temporal_model(dim, tc, cfg.heads)
    source = source_checkpoint(table.path.parent, table.manifest) if table is not None else None
    if tc.init_frame_heads and source is not None:
        if source.is_file():
            try:
                state = load_checkpoint(Path(source), map_location="cpu")
            except ValueError as exc:  # a weight file, not a run's checkpoint: no per-frame heads to copy
                log.info("init_frame_heads: %s holds no per-frame heads (%s); they start fresh", source, exc)
            else:
                done = load_frame_heads(model, state["model"])
                log.info("per-frame heads %s initialized from %s", done or "(none matched)", source)
        else:
            log.warning("init_frame_heads: the source checkpoint %s is gone; per-frame heads start fresh", source)
    return model


def _old_manifest_fingerprint(table: Path) -> str:
    """The data fingerprint affpipe 0.3 recorded in a temporal run folder's marker (the whole
    manifest but its timing): accepted on ``--resume`` so 0.3 runs continue."""
    from affpipe.lineage import fingerprint

    manifest = json.loads((Path(table) / "manifest.json").read_text())
    return fingerprint({k: v for k, v in manifest.items() if k != "throughput"})


class TemporalKind(RunKind):
    """Temporal heads over feature tables (see the module docstring)."""

    name = "temporal"
    title = "temporal"
    data_type = FeaturesData
    data_flag = "--features"
    start_is_candidate = True  # the skip path starts at the source run's predictions

    def data_fingerprint(self, cfg: TrainConfig) -> str:
        from affpipe.temporal.features import features_fingerprint, read_manifest

        prints = [features_fingerprint(read_manifest(f)) for f in cfg.data.features]
        return prints[0] if len(prints) == 1 else lineage.fingerprint(prints)

    def accepts_recorded(self, cfg: TrainConfig, recorded: str) -> bool:
        try:
            prints = [_old_manifest_fingerprint(f) for f in cfg.data.features]
        except (OSError, ValueError):
            return False
        return recorded == (prints[0] if len(prints) == 1 else lineage.fingerprint(prints))

    def setup(self, cfg: TrainConfig, ctx: dist.DistContext, run: Path) -> Setup:
        from affpipe.scoring.bootstrap import row_videos
        from affpipe.scoring.tasks import MultiTaskLoss, label_statistics
        from affpipe.temporal.features import features_fingerprint
        from affpipe.train.trainer import Trainer

        data = TemporalData.open(cfg.data.features, cfg.index)
        model = build_model_for(cfg, data.table.dim, data.table).to(ctx.device)
        loss_fn = MultiTaskLoss(cfg.heads, cfg.loss, label_statistics(data.label_table)).to(ctx.device)

        def loaders():
            kw = dict(device=ctx.device, rank=ctx.rank, world=ctx.world)
            return data.loader("train", cfg, train=True, **kw), data.loader("val", cfg, train=False, **kw)

        tc, tables = cfg.data.temporal, cfg.data.features
        what = f"with a {tc.arch} head over windows of {tc.window} frames of {' + '.join(map(str, tables))}"
        trainer = Trainer(cfg, ctx, model, loss_fn, channels_last=False)  # windows of vectors, not images
        trainer.row_videos = row_videos(data.label_table)  # validation intervals by video
        manifests = [t.manifest for t in data.tables]
        table_name = manifests[0].get("table", "frames")
        rec = lineage_record(self.name, table_name, lineage.rel_path(run, data.index),
                             index_fingerprint_of(manifests[0], data.index, table_name),
                             features=[lineage.rel_path(run, f) for f in tables],
                             features_fingerprint=[features_fingerprint(m) for m in manifests])
        return Setup(trainer, loaders, what, rec)

    def open_data(self, ckpt: Path, cfg: TrainConfig, rec: dict[str, Any] | None, *,
                  inputs: tuple[Path, ...], index: Path | None, index_flag: bool) -> OpenedData:
        from affpipe.temporal.features import features_fingerprint

        feats = run_data_paths(ckpt.parent, (rec or {}).get("features"), inputs, cfg.data.features)
        if not feats:
            raise ValueError(f"{ckpt}: no feature table recorded for this run; pass --features")
        for f in feats:
            if not Path(f).exists():
                raise FileNotFoundError(f"{ckpt}: its feature table {f} is not there (moved?); pass --features "
                                        "to point at it")
        if len(feats) != len(cfg.data.features):
            raise ValueError(f"--features: {ckpt} reads {len(cfg.data.features)} feature table(s) (fused in that "
                             f"order), {len(feats)} given")
        if index is not None and not index_flag and not Path(index).exists():
            index = None  # the recorded one is gone: the feature table names its own
        data = TemporalData.open(feats, index)
        actual = [features_fingerprint(t.manifest) for t in data.tables]
        for i, (fp, f, now) in enumerate(zip((rec or {}).get("features_fingerprint") or [], feats, actual,
                                             strict=False)):
            lineage.check(f"feature table #{i + 1}", fp, now, f"{ckpt} (what it trained on)", str(f))
        table_name = data.table.manifest.get("table", "frames")
        lineage.check("label index", (rec or {}).get("index_fingerprint"),
                      index_fingerprint_of(data.tables[0].manifest, data.index, table_name),
                      f"{ckpt} (what it trained on)", f"{data.index}")
        return OpenedData(tuple(feats), data.index, table_name, data.label_table, data)

    def restore_model(self, cfg: TrainConfig, state: dict[str, Any], data: OpenedData | None,
                      source: str) -> torch.nn.Module:
        from affpipe.train.frames import load_weights

        if data is not None:
            dim = data.payload.table.dim
        elif state.get("encoders"):  # an export carries its encoders' specs (and so the width)
            dim = sum(s.width for s in _specs(state, source))
        else:
            raise ValueError(f"{source}: a temporal head needs the width of its feature table")
        model = build_temporal_model(dim, cfg.data.temporal, cfg.heads)
        head = {k: v for k, v in state["model"].items() if not k.startswith(ENCODERS)}
        return load_weights(model, {**state, "model": head}, source,
                            f"a {cfg.data.temporal.arch} head over {dim}-wide features")

    def image_model(self, cfg: TrainConfig, state: dict[str, Any], source: str, ctx: CropContext) -> CropModel:
        """The run's frozen encoders (an export's own, else rebuilt from the feature tables the run
        trained on, each checked against its lineage and its source's sha256) and its head."""
        from affpipe.temporal.crops import TrackCrops

        if state.get("encoders"):
            specs = _specs(state, source)
            encoders = []
            for k, spec in enumerate(specs):
                net = spec.build()
                own = {key[len(f"{ENCODERS}{k}."):]: v for key, v in state["model"].items()
                       if key.startswith(f"{ENCODERS}{k}.")}
                try:
                    net.load_state_dict(own)
                except RuntimeError as exc:
                    first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
                    raise ValueError(f"{source}: its encoder #{k + 1} does not fit a {spec.model.get('arch')} "
                                     f"({first})") from None
                encoders.append(net)
        else:
            encoders, specs = self._table_encoders(cfg, source, ctx)
        head = self.restore_model(cfg, {**state, "encoders": [s.as_dict() for s in specs]}, None, source)
        return TrackCrops(encoders, specs, head, window=cfg.data.temporal.window,
                          stride=cfg.data.temporal.resolved_eval_stride)

    def _table_encoders(self, cfg: TrainConfig, source: str, ctx: CropContext) -> tuple[list, list[EncoderSpec]]:
        """The encoder of each feature table the run reads (flag, else lineage, else config)."""
        from affpipe.temporal.features import MANIFEST_FILE, features_fingerprint, read_manifest

        rec = ctx.lineage or {}
        feats = run_data_paths(Path(source).parent, rec.get("features"), ctx.inputs, cfg.data.features)
        if not feats or ctx.encoder is None:
            raise ValueError(f"{source}: no feature table recorded for this run; pass --features")
        if len(feats) != len(cfg.data.features):
            raise ValueError(f"--features: {source} reads {len(cfg.data.features)} feature table(s) (fused in that "
                             f"order), {len(feats)} given")
        encoders, specs = [], []
        for i, f in enumerate(feats):
            if not (Path(f) / MANIFEST_FILE).is_file():
                raise FileNotFoundError(f"{source}: its feature table {f} is not there (moved?); predicting on crops "
                                        "needs the encoder that embedded it: pass --features to point at the table")
            recorded = (rec.get("features_fingerprint") or [None] * len(feats))[i]
            lineage.check(f"feature table #{i + 1}", recorded, features_fingerprint(read_manifest(f)),
                          f"{source} (what it trained on)", str(f))
            net, spec = ctx.encoder(Path(f))
            encoders.append(net)
            specs.append(spec)
        return encoders, specs

    def export_state(self, cfg: TrainConfig, state: dict[str, Any], source: str, ctx: CropContext) -> dict[str, Any]:
        """The head and the frozen encoders its features came from: the file alone predicts on crops."""
        encoders, specs = self._table_encoders(cfg, source, ctx)
        tensors = dict(state["model"])
        for k, net in enumerate(encoders):
            tensors |= {f"{ENCODERS}{k}.{name}": t for name, t in net.state_dict().items()}
        return {**state, "model": tensors, "encoders": [s.as_dict() for s in specs]}

    def batches(self, cfg: TrainConfig, data: OpenedData, split: str, device: torch.device, *,
                batch_size: int | None = None, loader: LoaderConfig | None = None):
        return data.payload.loader(split, cfg, train=False, device=device, batch_size=batch_size)

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        feats = config.get("features")
        sources = [feats] if isinstance(feats, str) else list(feats or [])
        return {"temporal": (config.get("temporal") or {}).get("arch", "tcn"), "sources": sources}


def _specs(state: dict[str, Any], source: str) -> list[EncoderSpec]:
    raw = state.get("encoders")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: an export whose encoder records are unreadable")
    return [EncoderSpec.from_dict(d, f"{source}: encoder #{k + 1}") for k, d in enumerate(raw)]


TEMPORAL = TemporalKind()
