"""The kinds of run, registered in one place. ``kind_of(cfg)`` picks a config's kind by the type of
its data, ``kind_named(name)`` the kind a lineage records; nothing outside this module and the
kinds' own modules branches on the kind of a run (``tests/test_architecture.py`` checks).

A new kind implements ``affpipe.run.kind.RunKind`` in its own package and is added to ``KINDS``.
"""

from __future__ import annotations

from affpipe.pretrain.kind import PRETRAIN
from affpipe.run.config import TrainConfig
from affpipe.run.kind import RunKind
from affpipe.temporal.kind import TEMPORAL
from affpipe.train.frames import FRAMES

KINDS: tuple[RunKind, ...] = (FRAMES, TEMPORAL, PRETRAIN)


def kind_of(cfg: TrainConfig) -> RunKind:
    """The kind of run ``cfg`` describes (the type of its data)."""
    for kind in KINDS:
        if isinstance(cfg.data, kind.data_type):
            return kind
    raise ValueError(f"no kind of run trains on {type(cfg.data).__name__}")


def kind_named(name: str, where: str = "") -> RunKind:
    """The kind a lineage or a report names (``frames``, ``temporal``, ...)."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"{where + ': ' if where else ''}unknown kind of run {name!r} "
                     f"(known: {', '.join(k.name for k in KINDS)})")
