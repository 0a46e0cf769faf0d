"""Shards: the label table and its JPEGs packed into WebDataset tars with DALI indexes.

``format`` owns the on-disk format (tar layout, ``.idx``, ``manifest.json``); ``write`` plans and
writes shards (resumable; ``unlabelled``: the frames without a label, in shards of their own);
``verify`` re-reads and checks them; ``show`` draws a sample grid.
"""

from affpipe.shards.format import manifest_index, parse_idx, read_manifest, shard_paths
from affpipe.shards.show import write_grid
from affpipe.shards.unlabelled import (
    frame_counts,
    pretrain_fingerprint,
    pretrain_shard_paths,
    unlabelled_note,
)
from affpipe.shards.verify import verify_shards
from affpipe.shards.write import (
    ShardConfig,
    load_table,
    ordered_rows,
    plan_split,
    select_rows,
    write_shards,
)

__all__ = [
    "ShardConfig", "frame_counts", "load_table", "manifest_index", "ordered_rows", "parse_idx", "plan_split",
    "pretrain_fingerprint", "pretrain_shard_paths", "read_manifest", "select_rows", "shard_paths", "unlabelled_note",
    "verify_shards", "write_grid", "write_shards",
]
