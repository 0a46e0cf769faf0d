"""Tree → index → shards in one cached call: the data the benchmarks, the GPU script and
``affpipe experiments`` prepare for themselves.

``prepare_data(cache, ...)`` writes ``cache/tree`` (the synthetic twin, or a tree a callback
makes; none when ``root`` is given), ``cache/index`` and ``cache/shards``, and a stamp
``cache/cache.json`` with the parameters and the stage timings. A later call with the same
parameters reuses everything; with other parameters it rebuilds the cache folder (only files
it wrote itself live there). Stages are resumable on their own, so a killed call continues.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from affpipe.io import atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 2
STAMP = "cache.json"


def prepare_data(cache: Path, *, videos: int = 24, frames: int = 300, seed: int = 0, workers: int = 1,
                 layout: str = "abaw6", split: str = "train", mtl: bool = False, full_scale: bool = False,
                 root: Path | None = None, make_tree: Callable[[Path], Any] | None = None,
                 source: str = "affpipe.synth", samples_per_shard: int | None = None) -> dict[str, Any]:
    """Index and shards under ``cache`` (see the module docstring); returns the stamp's dict
    (``tree``, ``index``, ``shards``, ``train_samples``, ``setup_s``, ``reused``...)."""
    from affpipe.index.build import IndexConfig, build_index
    from affpipe.shards.write import ShardConfig, write_shards

    cache = Path(cache)
    params = {"cache_version": CACHE_VERSION, "videos": videos, "frames": frames, "seed": seed, "layout": layout,
              "split": split, "mtl": mtl, "full_scale": full_scale, "source": source,
              "root": str(Path(root).resolve()) if root is not None else None}
    if samples_per_shard is not None:  # only when asked: other callers' caches stay valid
        params["samples_per_shard"] = samples_per_shard
    stamp = cache / STAMP
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("params") == params:
            log.info("reusing the prepared data in %s", cache)
            return {**done, "reused": True}
        log.info("data parameters changed: rebuilding %s", cache)
        for name in ("tree", "index", "shards", STAMP):
            path = cache / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tree = Path(root) if root is not None else cache / "tree"
    if root is None:
        t0 = time.perf_counter()
        if make_tree is not None:
            make_tree(tree)
        else:
            from affpipe.synth.generate import SynthConfig, generate

            generate(SynthConfig(out=tree, layout=layout, videos=videos, frames=frames, seed=seed, mtl=mtl,
                                 full_scale=full_scale))
        timings["synth_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = build_index(IndexConfig(root=tree, out=cache / "index", workers=workers))
    timings["index_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = write_shards(ShardConfig(index=cache / "index", out=cache / "shards", split=split, workers=workers,
                                        seed=seed, samples_per_shard=samples_per_shard))
    timings["shard_s"] = time.perf_counter() - t0
    train = manifest["splits"].get("train", {})
    done = {
        "params": params, "source": source,
        "tree": str(tree), "index": str(cache / "index"), "shards": str(cache / "shards"),
        "index_rows": counts.get("frames"),
        "train_samples": train.get("samples"), "train_bytes": train.get("bytes"),
        "setup_s": {k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write_text(stamp, json.dumps(done, indent=1) + "\n")
    return {**done, "reused": False}
