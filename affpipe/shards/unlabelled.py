"""Unlabelled frames: which rows they are, in which order they are written, and what the manifest
says of them (counts per split, the note pre-training logs, the shards and fingerprint it reads).

The train and val crops without a label of the shards' tasks go, by default, into shards of their
own (``<split>/<split>-unlabelled-NNNNNN.tar``; ``affpipe.shards.write``), listed under
``splits.<split>.unlabelled`` of the manifest with ``splits.<split>.counts`` = ``{"labelled",
"unlabelled"}`` (``affpipe.shards.format`` reads and checks the file; this module reads the dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from affpipe.io import clip
from affpipe.shards.format import MANIFEST, read_manifest, shard_paths, shards_fingerprint


def unlabelled_rows(tbl: pa.Table, split: str, tasks: tuple[str, ...]) -> pa.Table:
    """Rows of ``split`` with an image and no valid label of ``tasks``, sorted by (video, frame)
    (none for ``test``, whose every crop is in its ordinary shards)."""
    if split == "test":
        return tbl.schema.empty_table()
    tbl = tbl.filter(pc.equal(tbl["split"], split))
    has_image = tbl["has_image"].to_numpy(zero_copy_only=False) & tbl["image"].is_valid().to_numpy(zero_copy_only=False)
    labelled = np.zeros(len(tbl), bool)
    for t in tasks:
        labelled |= tbl[f"{t}_valid"].to_numpy(zero_copy_only=False)
    return tbl.filter(pa.array(has_image & ~labelled)).sort_by([("video", "ascending"), ("frame", "ascending")])


def ordered_unlabelled(tbl: pa.Table, split: str, tasks: tuple[str, ...], seed: int, enabled: bool = True) -> pa.Table:
    """The unlabelled rows of ``split`` in the order they are written (train: their own seeded
    shuffle, drawn apart from the labelled rows' so that one never moves the other); none when
    not ``enabled`` (``--no-unlabelled``)."""
    kept = unlabelled_rows(tbl, split, tasks) if enabled else tbl.schema.empty_table()
    if split == "train" and len(kept):
        order = np.random.default_rng([seed, 0x0BEE]).permutation(len(kept))
        kept = kept.take(pa.array(order, pa.int64()))
    return kept


def recorded_skips(enabled: bool, split: str, skipped: dict[str, int]) -> dict[str, int]:
    """The skip counts the manifest records: ``no_label`` frames are not skipped when they went
    into the unlabelled shards (``enabled``)."""
    return {**skipped, "no_label": 0} if enabled and split != "test" else dict(skipped)


# ---- labelled / unlabelled frames (what pre-training reads) ---------------------------------


def frame_counts(out: Path, manifest: dict | None = None) -> dict[str, dict[str, int]]:
    """``{split: {"labelled": n, "unlabelled": m}}`` of the shards in ``out``, from the shard
    entries themselves; a recorded ``counts`` or ``samples`` that disagrees with them (a tampered
    or hand-edited manifest) is an error naming the key. Shards of affpipe 0.3 count 0 unlabelled
    in train and val; every ``test`` frame counts as unlabelled (its records carry no label)."""
    path = Path(out) / MANIFEST
    manifest = read_manifest(out, full=False) if manifest is None else manifest
    result = {}
    for split, info in manifest["splits"].items():
        main = sum(s["samples"] for s in info["shards"])
        got = {"labelled": main, "unlabelled": sum(s["samples"] for s in (info.get("unlabelled") or {}).get("shards", []))}
        if split == "test":
            got = {"labelled": 0, "unlabelled": main + got["unlabelled"]}
        recorded = [(f"splits.{split}.samples", info.get("samples"), main)]
        if "unlabelled" in info:
            recorded.append((f"splits.{split}.unlabelled.samples", info["unlabelled"].get("samples"), got["unlabelled"]))
        if "counts" in info:
            counts = info["counts"] if isinstance(info["counts"], dict) else {}
            recorded += [(f"splits.{split}.counts.{k}", counts.get(k, "missing"), got[k]) for k in got]
        for key, value, want in recorded:
            if value is not None and value != want:
                raise ValueError(f"{path}: {key} is {clip(json.dumps(value))} but its shards hold {want} samples "
                                 "(the manifest was edited or damaged); reshard with `affpipe shard`")
        result[split] = got
    return result


def unlabelled_note(out: Path, splits: tuple[str, ...] | None = None, manifest: dict | None = None) -> str | None:
    """``None`` when the shards of ``splits`` (default: all; ``test`` is left out, all its frames are
    unlabelled) hold unlabelled frames; else one plain
    line saying they hold none, and why (affpipe 0.3 shards, or written with ``--no-unlabelled``):
    what ``pretrain`` logs (it still pre-trains on the labelled frames' crops)."""
    manifest = read_manifest(out, full=False) if manifest is None else manifest
    counts = frame_counts(out, manifest)
    chosen = [s for s in (splits or tuple(counts)) if s in counts and s != "test"]
    if any(counts[s]["unlabelled"] for s in chosen):
        return None
    opts = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    why = ("written with --no-unlabelled" if opts.get("unlabelled") is False
           else "every crop of these splits has a label" if opts.get("unlabelled") is True
           else "written by affpipe 0.3, before unlabelled shards")
    return (f"{Path(out)}: these shards hold no unlabelled frames in {', '.join(chosen) or 'any split'} ({why}); "
            "pre-training sees only the labelled frames' crops — reshard with `affpipe shard` to add the others")


def pretrain_shard_paths(out: Path, split: str, manifest: dict | None = None) -> list[tuple[Path, Path]]:
    """``(tar, idx)`` pairs of every frame of ``split``, labelled and unlabelled: the labelled
    shards in manifest order, then the unlabelled ones (confined to ``out``)."""
    manifest = read_manifest(out, full=False) if manifest is None else manifest
    pairs = shard_paths(out, split, manifest)
    extra = (manifest["splits"][split].get("unlabelled") or {}).get("shards", [])
    return pairs + [(Path(out) / s["file"], Path(out) / s["index_file"]) for s in extra]


def pretrain_fingerprint(manifest: dict) -> str:
    """The lineage fingerprint of every frame pre-training may read: :func:`shards_fingerprint`'s
    inputs plus the unlabelled shards' sha256 (supervised runs keep recording ``shards_fingerprint``,
    which the unlabelled shards do not change)."""
    from affpipe.lineage import fingerprint

    unl = {split: [s.get("sha256") for s in (info.get("unlabelled") or {}).get("shards", [])]
           for split, info in sorted((manifest.get("splits") or {}).items())}
    return fingerprint({"shards": shards_fingerprint(manifest), "unlabelled": unl})
