"""What ``affpipe synth`` generates (``SynthConfig``) and each video's place in the tree
(``VideoPlan``): the types ``generate``, ``images`` and ``text`` share, below all three."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. ``frames`` is the mean number of frames per video; with
    ``full_scale`` a small pool of faces is rendered and hard-linked into every frame
    (pass ``videos=FULL_SCALE_VIDEOS, frames=FULL_SCALE_FRAMES`` of ``affpipe.synth.generate`` for
    Aff-Wild2's size)."""

    out: Path
    layout: str = "abaw6"
    videos: int = 24
    frames: int = 300
    seed: int = 0
    mtl: bool = False
    full_scale: bool = False
    test_videos: int = 0  # extra videos with crops and no annotation, named by the test lists


@dataclass
class VideoPlan:
    """One video's place in the tree."""

    idx: int
    name: str
    length: int  # frames on the timeline (rows of the truth)
    tasks: dict[str, str] = field(default_factory=dict)  # task -> "train" | "val" (its set folder)
    root: int = 0  # image root index
    lines: int = 0  # annotation lines per task file
    images_upto: int = 0  # frames after this have no image
    role: str = ""
    test_tasks: tuple[str, ...] = ()  # role "test": the challenges whose test lists name it

    @property
    def split(self) -> str:
        if self.role == "test":
            return "test"
        return "val" if "val" in self.tasks.values() else "train"
