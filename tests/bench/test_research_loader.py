"""The research's baseline loader: right rows, right labels, right shapes, per-epoch shuffling."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from affpipe.batch import Batch
from affpipe.bench.research_loader import make_research_loader
from affpipe.index.build import load_index
from affpipe.labels import AU_NAMES


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process loading (num_workers=0) like a DataLoader worker: one torch thread.

    With several intra-op threads on a busy machine, per-image ToTensor/Normalize spin-wait
    for ~10 ms each; DataLoader workers avoid that by running single-threaded.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(index_dir, split):
    table, _ = load_index(index_dir)
    t = table.filter(pc.and_(pc.equal(table["split"], split), table["has_image"]))
    return {int(r["row_id"]): r for r in t.to_pylist()}, t


def _check_labels(b: Batch, rows: dict) -> None:
    rs = [rows[rid] for rid in b.row_id.tolist()]
    col = lambda k: np.array([r[k] for r in rs])  # noqa: E731
    va_valid, expr_valid = col("va_valid"), col("expr_valid")
    assert np.array_equal(b.va_mask.numpy(), va_valid)
    np.testing.assert_allclose(b.va.numpy()[va_valid], np.stack([col("valence"), col("arousal")], 1)[va_valid], atol=1e-6)
    assert np.array_equal(b.expr_mask.numpy(), expr_valid)
    assert np.array_equal(b.expr.numpy()[expr_valid], col("expr")[expr_valid])
    au = np.stack([col(a) for a in AU_NAMES], 1)
    au_valid = col("au_valid")[:, None] & (au >= 0)
    assert np.array_equal(b.au_mask.numpy(), au_valid)
    assert np.array_equal(b.au.numpy()[au_valid], au[au_valid])


def test_val_in_order_with_labels_and_shapes(index_dir):
    rows, t = _rows(index_dir, "val")
    assert len(rows) > 0
    loader = make_research_loader(index_dir, "val", batch_size=7, num_workers=0, train=False)
    seen = []
    for b in loader:
        assert isinstance(b, Batch)
        assert b.images.shape == (len(b), 3, 112, 112) and b.images.dtype == torch.float32
        assert b.va.shape == (len(b), 2) and b.au.shape == (len(b), 12) and b.expr.shape == (len(b),)
        # normalized with ImageNet statistics: values leave [0, 1] on both sides
        assert b.images.min() < 0 and b.images.max() <= (1 - 0.406) / 0.225 + 1e-4
        _check_labels(b, rows)
        seen += b.row_id.tolist()
    assert seen == t["row_id"].to_pylist()  # every val frame with an image once, in (video, frame) order


def test_train_shuffles_augments_and_drops_last(index_dir):
    rows, _ = _rows(index_dir, "train")
    loader = make_research_loader(index_dir, "train", batch_size=16, num_workers=1, image_size=64, seed=3)
    epochs = []
    for _ in range(2):
        ids = []
        for b in loader:
            assert len(b) == 16 and b.images.shape == (16, 3, 64, 64)
            _check_labels(b, rows)
            ids += b.row_id.tolist()
        assert len(ids) == len(rows) // 16 * 16 and set(ids) <= set(rows)
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert epochs[0] != sorted(epochs[0])


def test_augmentation_is_random_but_labels_fixed(index_dir):
    """Two passes over the same val rows with train-time transforms differ in pixels only."""
    from affpipe.bench.research_loader import ResearchDataset, research_rows

    paths, records = research_rows(index_dir, "val")
    ds = ResearchDataset(paths[:4], records[:4], train=True)
    torch.manual_seed(0)
    a = [ds[i] for i in range(4)]
    b = [ds[i] for i in range(4)]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert np.array_equal(torch.stack([x[1] for x in a]).numpy(), records[:4].view(np.uint8).reshape(4, 32))


def test_bad_split(index_dir):
    with pytest.raises(ValueError, match="split"):
        make_research_loader(index_dir, "test", batch_size=4, num_workers=0)
