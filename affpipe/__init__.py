"""affpipe: Aff-Wild2 at full scale — label tables, WebDataset shards, DALI loaders, trainers."""

__version__ = "0.3.0"
