"""Training configuration: the frozen ``TrainConfig``, recipe TOML loading, JSON round trip.

A run is described by a recipe (``pipelines/*.toml``; sections ``[model]``, ``[loss]``, ``[loader]``,
``[temporal]``, ``[logging]``), command-line flags that override it,
and the resolved result, which is saved as ``config.json`` in the run folder and inside every
checkpoint. ``to_dict``/``from_dict`` round-trip it exactly; unknown keys are an error that
names the key and the file (with the line when it can be found), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from affpipe.loaders.base import LoaderConfig
from affpipe.loaders.pretrain import PretrainData
from affpipe.loaders.views import ViewConfig
from affpipe.models.model import ModelConfig
from affpipe.scoring.tasks import LossConfig

# Heads each task trains, and the validation score that drives ReduceLROnPlateau and best.pt.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "va": ("va",), "expr": ("expr",), "au": ("au",), "mtl": ("va", "expr", "au"),
}
SCORE_KEY: dict[str, str] = {"va": "va_ccc", "expr": "expr_f1", "au": "au_f1", "mtl": "p_mtl"}
OPTIMIZERS = ("adam", "adamw", "sgd")
AMP_MODES = ("bf16", "fp16", "none")
DEVICES = ("auto", "cpu", "cuda")


TEMPORAL_ARCHS = ("tcn", "transformer")


@dataclass(frozen=True)
class LoggingConfig:
    """What a run logs besides ``metrics.jsonl`` (always written, the source of truth).
    ``tensorboard``: event files in the run folder (``pip install 'affpipe[tensorboard]'``)."""

    tensorboard: bool = False


@dataclass(frozen=True)
class TemporalConfig:
    """Temporal head options (``affpipe.temporal``), used when ``TrainConfig.features`` is set.

    ``window`` consecutive frames per sequence, a new training window every ``stride`` frames;
    evaluation windows every ``eval_stride`` frames (default: half a window), averaged where
    they overlap. ``init_frame_heads``: start the per-frame skip path from the heads of the
    checkpoint the features came from (when it has them).
    """

    arch: str = "tcn"
    window: int = 64
    stride: int = 16
    eval_stride: int | None = None
    hidden: int = 128
    layers: int = 4
    kernel: int = 3
    attention_heads: int = 4
    dropout: float = 0.2
    input_dropout: float = 0.2
    init_frame_heads: bool = True

    def __post_init__(self) -> None:
        if self.arch not in TEMPORAL_ARCHS:
            raise ValueError(f"temporal.arch must be one of {TEMPORAL_ARCHS}, got {self.arch!r}")
        for name in ("window", "stride", "hidden", "layers", "kernel", "attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"temporal.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_stride is not None and not 1 <= self.eval_stride <= self.window:
            raise ValueError(f"temporal.eval_stride must be in [1, window={self.window}], got {self.eval_stride}")
        if self.kernel % 2 == 0:
            raise ValueError(f"temporal.kernel must be odd (centred convolutions), got {self.kernel}")
        if self.arch == "transformer" and self.hidden % self.attention_heads:
            raise ValueError(f"temporal.hidden ({self.hidden}) must be divisible by temporal.attention_heads")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"temporal.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def resolved_eval_stride(self) -> int:
        return self.eval_stride or max(1, self.window // 2)


def _as_paths(obj: Any, names: tuple[str, ...]) -> None:
    """A frozen dataclass's path fields given as strings, as ``Path``s."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, Path):
            object.__setattr__(obj, name, Path(value))


@dataclass(frozen=True)
class ShardsData:
    """A per-frame run's data: WebDataset shards (``affpipe shard``) and, when it is not where
    their manifest says, the label index they were written from."""

    kind: ClassVar[str] = "frames"
    shards: Path | None = None
    index: Path | None = None
    # Train on the labels of this share of the train videos (drawn by the run's seed; the other
    # videos' frames are still read, their labels masked): the labelled-fraction experiments.
    label_fraction: float = 1.0

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The paths the run reads (its shard folder)."""
        return () if self.shards is None else (self.shards,)

    @property
    def source(self) -> str:
        return str(self.shards)

    def __post_init__(self) -> None:
        _as_paths(self, ("shards", "index"))
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")


@dataclass(frozen=True)
class FeaturesData:
    """A temporal run's data: one feature table (``affpipe embed``), or several joined row for
    row and concatenated (fused features), the label index (when it is not where the first
    table's manifest says) and the temporal head's options."""

    kind: ClassVar[str] = "temporal"
    features: tuple[Path, ...]
    index: Path | None = None
    temporal: TemporalConfig = field(default_factory=TemporalConfig)

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The paths the run reads (its feature tables, in fusion order)."""
        return self.features

    @property
    def source(self) -> str:
        return " + ".join(map(str, self.features))

    def __post_init__(self) -> None:
        raw = self.features
        tables = (Path(raw),) if isinstance(raw, str | Path) else tuple(Path(p) for p in raw)
        if not tables:
            raise ValueError("features: give at least one feature table")
        if len(set(tables)) != len(tables):
            raise ValueError(f"features: a table is listed twice: {[str(p) for p in tables]}")
        object.__setattr__(self, "features", tables)
        if self.index is not None and not isinstance(self.index, Path):
            object.__setattr__(self, "index", Path(self.index))


# ---- pre-training (the third kind): its recipe's sections, recorded in config.json -----------

PRETRAIN_METHODS = ("mae", "simsiam")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule. ``lr = blr * batch_size / 256`` (the linear scaling rule both
    papers use); cosine decay to ``min_lr`` after ``warmup_epochs`` of linear warm-up."""

    optimizer: str = "adamw"  # adamw | sgd
    blr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    warmup_epochs: float = 40.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optim.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.blr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.min_lr < 0:
            raise ValueError("optim: blr must be > 0; weight_decay, warmup_epochs and min_lr >= 0")

    def lr(self, batch_size: int) -> float:
        """The peak learning rate for ``batch_size`` (summed over ranks)."""
        return self.blr * batch_size / 256


@dataclass(frozen=True)
class MAEConfig:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


@dataclass(frozen=True)
class SimSiamConfig:
    proj_dim: int = 2048
    pred_dim: int = 512
    proj_layers: int = 3


@dataclass(frozen=True)
class SSLData:
    """A pre-training run's data and method (``affpipe pretrain``): the shard folder (every crop
    of ``data.splits``, labelled or not), the label index (when it is not where the manifest
    says; the probe reads the labelled frames), the method and its recipe sections, the views,
    and the probe (``probe_k`` neighbours among ``probe_frames`` labelled train frames).
    ``config.json`` keeps it under ``pretrain`` (with ``shards``/``index`` at the top level)."""

    kind: ClassVar[str] = "pretrain"
    shards: Path | None = None
    index: Path | None = None
    method: str = "simsiam"
    data: PretrainData = field(default_factory=PretrainData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    views: tuple[ViewConfig, ...] = (ViewConfig(), ViewConfig())
    probe_k: int = 20
    probe_frames: int = 2000

    inputs = ShardsData.inputs  # the shard folder, as a per-frame run's
    source = ShardsData.source

    def __post_init__(self) -> None:
        _as_paths(self, ("shards", "index"))
        if self.method not in PRETRAIN_METHODS:
            raise ValueError(f"pretrain.method must be one of {PRETRAIN_METHODS}, got {self.method!r}")
        if not self.views:
            raise ValueError("pretrain.views: give at least one view")
        if self.method == "simsiam" and len(self.views) != 2:
            raise ValueError(f"simsiam takes exactly 2 views, the recipe has {len(self.views)}")
        if self.probe_k < 1 or self.probe_frames < 1:
            raise ValueError(f"pretrain.probe_k and probe_frames must be >= 1, got {self.probe_k}, {self.probe_frames}")


RunData = ShardsData | FeaturesData | SSLData
# The keys of a config file (recipe TOML, config.json) that make up ``TrainConfig.data``.
DATA_KEYS = ("shards", "features", "index", "temporal", "pretrain", "label_fraction")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. ``batch_size`` is per process (per GPU)."""

    task: str = "mtl"
    # What the run trains on, and so its kind: shards (per-frame) or feature tables (temporal).
    data: ShardsData | FeaturesData | SSLData = field(default_factory=ShardsData)
    out: Path | None = None
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    plateau_patience: int = 2  # ReduceLROnPlateau on the validation score
    plateau_factor: float = 0.1
    min_lr: float = 1e-6
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # GPU only; ignored (with a log line) on CPU
    channels_last: bool = True  # GPU only
    compile: bool = False
    image_size: int = 112
    ckpt_every: int = 0  # also write last.pt every N optimizer steps (0: once per epoch)
    val_every: int = 1  # validate every N epochs (and always after the last)
    max_steps_per_epoch: int | None = None
    max_val_steps: int | None = None
    log_every: int = 20
    sync_timing: bool = False  # cuda.synchronize around timings: exact data-wait, a bit slower
    seed: int = 0
    resume: bool = False
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.task not in TASK_HEADS:
            raise ValueError(f"task must be one of {sorted(TASK_HEADS)}, got {self.task!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {self.device!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "momentum", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 0:
            raise ValueError(f"plateau_patience must be >= 0, got {self.plateau_patience}")
        for name in ("epochs", "batch_size", "val_every", "log_every", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps_per_epoch", "max_val_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0, got {self.ckpt_every}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        # The heads follow the task; a recipe never has to repeat them.
        heads = TASK_HEADS[self.task]
        if tuple(self.model.tasks) != heads:
            object.__setattr__(self, "model", replace(self.model, tasks=heads))
        if self.out is not None and not isinstance(self.out, Path):
            object.__setattr__(self, "out", Path(self.out))
        if not isinstance(self.data, ShardsData | FeaturesData | SSLData):
            raise ValueError(f"data must be ShardsData, FeaturesData or SSLData, got {type(self.data).__name__}")

    @classmethod
    def of(cls, **flat: Any) -> TrainConfig:
        """A config from the keys of a config file (``shards=``, ``features=``, ``index=``,
        ``temporal=`` among the others), as ``from_dict`` reads them."""
        return from_dict(flat)

    @property
    def heads(self) -> tuple[str, ...]:
        return TASK_HEADS[self.task]

    @property
    def kind(self) -> str:
        """The kind of run its data makes it (``affpipe.runs.kinds`` dispatches on it)."""
        return self.data.kind

    @property
    def index(self) -> Path | None:
        """The label index given for the run's data (None: where its data's manifest says)."""
        return self.data.index

    @property
    def score_key(self) -> str:
        return SCORE_KEY[self.task]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass: Paths as str, tuples as lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    if isinstance(cfg, TrainConfig):  # the data's keys sit at the top level, as in 0.3's config.json
        out = {k: v for k, v in plain(cfg).items() if k != "data"}
        return {**out, **data_dict(cfg.data)}
    return plain(cfg)


def flat_config(cfg: TrainConfig, leave_out: Callable[[str], bool] = lambda name: False) -> dict[str, Any]:
    """``to_dict(cfg)`` flattened to dotted keys (``model.arch``, ``loss.va_loss``...), without the
    keys ``leave_out`` names: what a run folder's marker and an experiments cell record."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for key, value in d.items():
            name = prefix + key
            if isinstance(value, Mapping):
                walk(value, name + ".")
            elif not leave_out(name):
                flat[name] = value

    walk(to_dict(cfg), "")
    return flat


def data_dict(data: RunData) -> dict[str, Any]:
    """The config-file keys of a run's data (``DATA_KEYS``): one feature table as a path, several
    as a list, ``features`` null and the default temporal options for a per-frame run."""
    if isinstance(data, FeaturesData):
        tables = [str(p) for p in data.features]
        return {"shards": None, "features": tables[0] if len(tables) == 1 else tables,
                "index": None if data.index is None else str(data.index), "temporal": to_dict(data.temporal)}
    if isinstance(data, SSLData):  # a pre-training run: its method and recipe under ``pretrain``
        own = {f.name: to_dict(getattr(data, f.name)) for f in fields(SSLData) if f.name not in ("shards", "index")}
        return {"shards": None if data.shards is None else str(data.shards), "features": None,
                "index": None if data.index is None else str(data.index), "temporal": to_dict(TemporalConfig()),
                "pretrain": own}
    fraction = {} if data.label_fraction == 1.0 else {"label_fraction": data.label_fraction}  # 0.4's keys otherwise
    return {"shards": None if data.shards is None else str(data.shards), "features": None,
            "index": None if data.index is None else str(data.index), "temporal": to_dict(TemporalConfig()),
            **fraction}


# Keys that lived at the top level before the [loader] section (affpipe 0.1 run folders).
_MOVED_TO_LOADER = ("backend", "num_workers", "flip_p", "max_rotation")


RESOLVED_KEY = "resolved"  # config.json's record of what `auto` became (RunFolder.write_config); never an input


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> TrainConfig:
    """Rebuild a ``TrainConfig`` from ``to_dict`` output (or a parsed recipe, or a run's
    ``config.json``, whose ``resolved`` record is no input); a 0.1 config's top-level loader keys
    are read into ``loader``."""
    data = dict(data)
    data.pop(RESOLVED_KEY, None)
    moved = {k: data.pop(k) for k in _MOVED_TO_LOADER if k in data}
    if moved:
        data["loader"] = {**moved, **dict(data.get("loader", {}))}
    return _build_train(data, source, None, {})


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"


def load_config(recipe: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Recipe (TOML, or a run's ``config.json``) → flags override → frozen ``TrainConfig``.

    ``overrides`` maps keys to values; nested fields use dotted keys (``"model.init"``,
    ``"loss.va_loss"``); ``None`` values mean "flag not given" and are skipped.
    """
    data: dict[str, Any] = {}
    text = ""
    source = "<defaults>"
    if recipe is not None:
        path = Path(recipe)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read recipe {path}: {exc}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
        if path.suffix == ".json" and isinstance(data, dict):
            data.pop(RESOLVED_KEY, None)  # a run's config.json: what auto resolved to there is no input
    section = data.get("temporal")
    if isinstance(section, dict) and "features" in section:  # `[temporal] features = [...]`: the same key
        if "features" in data:
            raise ValueError(f"{source}{_line_of(text, 'features')}: features given twice (top level and [temporal])")
        data = {**data, "temporal": {k: v for k, v in section.items() if k != "features"},
                "features": section["features"]}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
        node[leaf] = value
    temporal_recipe = data.get("model") == "temporal"
    if temporal_recipe:  # `model = "temporal"`: a temporal head; [temporal] holds its options
        data["model"] = {}
        if data.get("features") is None:
            raise ValueError(f'{source}{_line_of(text, "model")}: model = "temporal" needs a feature table '
                             "(features = \"FEATS\" or --features FEATS, from `affpipe embed`)")
    return _build_train(data, source, text, overrides or {})


# The train flags of the temporal options (what a message names when a flag set them).
_TEMPORAL_FLAGS = {"temporal.arch": "--temporal-arch", "temporal.window": "--window", "temporal.stride": "--stride"}


def _build_train(data: Mapping[str, Any], source: str, text: str | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from a config file's keys: ``DATA_KEYS`` become the run's data, of the
    kind they describe. Options that only the other kind reads cannot be built: temporal options
    without a feature table, shards beside one — one line naming the flag or the file's line."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a run config must be a table, got {type(data).__name__}")
    data = dict(data)
    picked = {k: data.pop(k) for k in DATA_KEYS if k in data}

    def named(key: str, flag: str) -> str:
        if overrides.get(key) is not None:
            return flag
        return f"{source}{_line_of(text, key.split('.')[-1])}: {key}"

    index = _coerce(picked.get("index"), Path | None, f"{source}{_line_of(text, 'index')}: index")
    temporal = picked.get("temporal") or {}
    if not isinstance(temporal, TemporalConfig):
        temporal = _build(TemporalConfig, temporal, source, "temporal.", text)
    features = picked.get("features")
    fraction = picked.get("label_fraction")
    if fraction is not None and (features is not None or picked.get("pretrain") is not None):
        raise ValueError(f"{named('label_fraction', '--label-fraction')}: a labelled fraction applies to a per-frame "
                         "run on shards (a temporal head or pre-training reads no subset); drop it")
    if picked.get("pretrain") is not None:  # a pre-training run (``affpipe pretrain``)
        if features is not None:
            raise ValueError(f"{named('features', '--features')}: a pre-training run reads shards, not a feature table")
        section = picked["pretrain"]
        if not isinstance(section, Mapping | SSLData):
            raise ValueError(f"{source}{_line_of(text, 'pretrain')}: [pretrain] must be a table")
        if isinstance(section, SSLData):
            run_data = replace(section, shards=picked.get("shards") or section.shards, index=index or section.index)
        else:
            shards = _coerce(picked.get("shards"), Path | None, f"{source}{_line_of(text, 'shards')}: shards")
            run_data = _build(SSLData, {**section, "shards": shards, "index": index}, source, "pretrain.", text)
        return _build(TrainConfig, {**data, "data": run_data}, source, "", text)
    if features is not None:
        if picked.get("shards") is not None:
            raise ValueError(f"{named('shards', '--shards')}: a run on a feature table (--features) reads no shards "
                             "(the table records the shards it was embedded from); drop --shards")
        where = f"{source}{_line_of(text, 'features')}: features"
        tables = _coerce(features, tuple[Path, ...], where) if isinstance(features, list | tuple) else (
            _coerce(features, Path, where),)
        try:
            run_data: RunData = FeaturesData(tables, index, temporal)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    else:
        default = TemporalConfig()
        changed = [f.name for f in fields(TemporalConfig) if getattr(temporal, f.name) != getattr(default, f.name)]
        if changed:
            key = f"temporal.{changed[0]}"
            raise ValueError(f"{named(key, _TEMPORAL_FLAGS.get(key, '--config'))}: temporal options apply to a "
                             "temporal head over a feature table; add --features FEATS (from `affpipe embed`) "
                             "or drop the option")
        shards = _coerce(picked.get("shards"), Path | None, f"{source}{_line_of(text, 'shards')}: shards")
        where = f"{source}{_line_of(text, 'label_fraction')}: label_fraction"
        fraction = 1.0 if fraction is None else _coerce(fraction, float, where)
        try:
            run_data = ShardsData(shards, index, fraction)
        except ValueError as exc:
            raise ValueError(f"{named('label_fraction', '--label-fraction')}: {exc}") from None
    return _build(TrainConfig, {**data, "data": run_data}, source, "", text)


# --- generic dataclass construction with key and type checks --------------------------------


def _line_of(text: str | None, key: str) -> str:
    if not text:
        return ""
    for lineno, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*[=:]", line) or re.match(rf"\s*\[\[?{re.escape(key)}\]", line):
            return f":{lineno}"
    return ""


def _build(cls: type, data: Mapping[str, Any], source: str, prefix: str, text: str | None) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    if cls is TrainConfig:  # a config file names the data's keys, never ``data``
        known = (known - {"data"}) | set(DATA_KEYS)
    unknown = sorted(set(data) - known - ({"data"} if cls is TrainConfig else set()))
    if unknown:
        key = unknown[0]
        raise ValueError(
            f"{source}{_line_of(text, key)}: unknown key {prefix + key!r}; "
            f"known keys{' in [' + prefix.rstrip('.') + ']' if prefix else ''}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        where = f"{source}{_line_of(text, name)}: {prefix + name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            kwargs[name] = value  # built already (a run's data, by _build_train)
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, f"{prefix}{name}.", text)
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(item := typing.get_args(hint)[0]):
            if not isinstance(value, list | tuple):  # an array of tables ([[run]])
                raise ValueError(f"{where} must be an array of tables ([[{prefix + name}]])")
            kwargs[name] = tuple(_build(item, v, source, f"{prefix}{name}.", text) for v in value)
        else:
            kwargs[name] = _coerce(value, hint, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from exc


def build_typed(cls: type, data: Mapping[str, Any], source: str, text: str | None = None) -> Any:
    """The typed loader every config file goes through (recipes, ``grid.toml``): a frozen
    dataclass from parsed TOML/JSON, unknown keys and wrong types refused with ``file:line``."""
    return _build(cls, data, source, "", text)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint; widen int→float, str→Path, list→tuple."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(value if item is Any else (_coerce(v, item, where) for v in value))
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ValueError(f"{where} must be a path string, got {value!r}")
        return Path(value)
    return value
