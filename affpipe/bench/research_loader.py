"""The research's baseline loader, kept as the yardstick ``affpipe bench`` measures against.

This is deliberately the slow path the research used: one JPEG file per frame, opened with
PIL, augmented per sample by torchvision's PIL transforms (Resize, RandomHorizontalFlip,
RandomRotation(10), ToTensor, Normalize) inside a ``torch.utils.data.Dataset`` and batched
by a ``DataLoader`` with one worker per core. Do not optimize it: the benchmark's ratios are
only meaningful against the pipeline the research actually ran. It yields the same ``Batch``
as every other loader so the training step cannot tell the difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from affpipe.batch import MEAN, STD, Batch, make_batch
from affpipe.dist import usable_cores
from affpipe.labels import RECORD_SIZE, records_from_table

SPLITS = ("train", "val", "all")


def _transforms(image_size: int, train: bool):
    from torchvision import transforms

    steps = [transforms.Resize(image_size)]
    if train:
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)]
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(steps)


class ResearchDataset(Dataset):
    """Rows of the label table that have an image: ``(image [3,H,W] float, record uint8 [32])``."""

    def __init__(self, paths: list[Path], records: np.ndarray, image_size: int = 112, train: bool = True):
        if len(paths) != len(records):
            raise ValueError(f"{len(paths)} image paths but {len(records)} label records")
        self.paths = [str(p) for p in paths]
        # One contiguous uint8 block; each item is a 32-byte view, as a shard's .lbl would be.
        self.raw = np.ascontiguousarray(records).view(np.uint8).reshape(len(records), RECORD_SIZE)
        self.transform = _transforms(image_size, train)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return self.transform(img), torch.from_numpy(self.raw[i].copy())


def collate_batch(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """Stack ``(image, record)`` pairs into a ``Batch``."""
    images = torch.stack([im for im, _ in items])
    raw = torch.stack([r for _, r in items])
    return make_batch(images, raw)


def research_rows(index: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """Image paths and label records of the rows of ``split`` that have an image."""
    from affpipe.index.build import image_path, load_index

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    table, meta = load_index(Path(index))
    mask = pc.equal(table.column("has_image"), True)
    if split != "all":
        mask = pc.and_(mask, pc.equal(table.column("split"), split))
    table = table.filter(mask)
    roots = table.column("image_root").to_pylist()
    images = table.column("image").to_pylist()
    paths = [image_path(meta, int(r), im) for r, im in zip(roots, images, strict=True)]
    return paths, records_from_table(table)


def make_research_loader(
    index: Path,
    split: str,
    *,
    batch_size: int,
    num_workers: int | None = None,
    image_size: int = 112,
    seed: int = 0,
    train: bool = True,
) -> DataLoader:
    """The research's per-frame JPEG loader over the label table at ``index``.

    ``num_workers`` defaults to the usable cores (what the research used). With ``train``
    the rows are shuffled every epoch and flip + rotation(±10°) augmentation applies; without
    it, rows come in (video, frame) order, unaugmented. Yields ``Batch`` on the CPU.
    """
    paths, records = research_rows(index, split)
    if not paths:
        raise ValueError(f"{index}: no rows with an image in split {split!r}")
    if num_workers is None:
        num_workers = usable_cores()
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        ResearchDataset(paths, records, image_size=image_size, train=train),
        batch_size=batch_size,
        shuffle=train,
        num_workers=num_workers,
        collate_fn=collate_batch,
        drop_last=train,
        generator=gen,
        persistent_workers=num_workers > 0,
    )


__all__ = ["ResearchDataset", "collate_batch", "make_research_loader", "research_rows"]
