"""The synthetic Aff-Wild2 twin: ``generate`` writes the tree, ``faces`` draws the faces."""

from affpipe.synth.generate import (
    FULL_SCALE_FRAMES,
    FULL_SCALE_VIDEOS,
    LAYOUTS,
    SynthConfig,
    format_summary,
    generate,
)

__all__ = ["FULL_SCALE_FRAMES", "FULL_SCALE_VIDEOS", "LAYOUTS", "SynthConfig", "format_summary", "generate"]
