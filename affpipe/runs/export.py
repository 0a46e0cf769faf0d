"""``affpipe export RUN -o FILE.safetensors``: a run's model, weights only, for sharing and predicting.

The checkpoint a run opens as (``best.pt``, else ``last.pt``) carries the optimizer and scheduler
state (~134 MB for a ResNet-18); the export keeps the model's tensors, the resolved config, the
run's tuned AU thresholds and smoothing windows, the source checkpoint's sha256, and for a
temporal run the frozen encoders its feature tables were embedded with (so the file alone
predicts on crops and videos)
(``affpipe.run.exported``: the format, its digest and the refusal of a changed file).
``open_run``, ``predict`` and ``predict --video`` take the file in place of a run folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """What ``export`` writes: the run (folder or checkpoint) and the file."""

    run: Path
    out: Path
    overwrite: bool = False


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write ``cfg.run``'s model to ``cfg.out``; returns what was recorded (sizes, sha256s)."""
    from affpipe.io import sha256_file
    from affpipe.labels import AU_NAMES
    from affpipe.run.exported import is_export, read_export, write_export
    from affpipe.runs.open import RunInputs, open_run

    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"-o {out}: an export is a .safetensors file (name it FILE.safetensors)")
    if out.is_symlink() or out.is_dir():
        raise ValueError(f"-o {out}: is a folder or a symlink; give a file name")
    if out.exists():
        if not cfg.overwrite:
            raise ValueError(f"-o {out}: exists; pass --overwrite to replace it")
        if is_export(out):
            read_export(out)  # a user's other .safetensors file (not ours) is refused, never replaced
    run = open_run(RunInputs(run=Path(cfg.run)), data=False)
    if run.exported:
        raise ValueError(f"{cfg.run}: already an export; nothing to do")
    thresholds = run.au_thresholds()
    try:
        smoothing = run.smoothing_windows()
    except FileNotFoundError:
        smoothing = None
    state = run.kind.export_state(run.cfg, run.state, str(run.ckpt), run.crop_context())
    meta = write_export(state, out, source=run.ckpt, source_sha256=sha256_file(run.ckpt),
                        au_thresholds=None if thresholds is None else dict(zip(AU_NAMES, thresholds, strict=True)),
                        smoothing=smoothing)
    summary = {"file": str(out), "bytes": out.stat().st_size, "source": str(run.ckpt),
               "source_bytes": run.ckpt.stat().st_size, "source_sha256": meta["source_sha256"],
               "au_thresholds": thresholds is not None, "smoothing": smoothing is not None,
               "kind": run.kind.name, "heads": list(run.cfg.heads),
               "encoders": [e["source"] for e in state.get("encoders") or []]}
    log.info("exported %s (%d bytes) from %s (%d bytes)", out, summary["bytes"], run.ckpt, summary["source_bytes"])
    return summary
