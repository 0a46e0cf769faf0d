"""Index: find an Aff-Wild2 tree's layout, parse its annotations, write the label tables.

``annotations`` detects every ABAW edition's layout and parses the annotation files;
``build`` writes ``frames.parquet``, ``videos.parquet`` and ``index.json``; ``stats`` summarizes
and plots a label table.
"""

from affpipe.index.annotations import parse_annotation
from affpipe.index.build import (
    TABLE_FILES,
    IndexConfig,
    build_index,
    format_summary,
    image_path,
    load_index,
)
from affpipe.index.layout import find_layout
from affpipe.index.mtl import parse_mtl

__all__ = [
    "TABLE_FILES", "IndexConfig", "build_index", "find_layout", "format_summary", "image_path", "load_index",
    "parse_annotation", "parse_mtl",
]
