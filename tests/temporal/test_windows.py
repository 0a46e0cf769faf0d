import numpy as np
import pytest
import torch
from temporal_support import labels, toy_table

from affpipe.temporal.data import WindowLoader
from affpipe.temporal.heads import TemporalModel
from affpipe.temporal.windows import GAP, epoch_order, plan_windows


def test_windows_stay_in_one_video_and_mask_gaps(tmp_path):
    t = toy_table(tmp_path)
    plan = plan_windows(t.video, t.frame, t.rows_of("all"), length=8, stride=4, cover=True)
    r = plan.rows(np.arange(len(plan)))
    for w in r:
        got = w[w != GAP]
        assert len(set(t.video[got])) == 1 and (np.diff(t.frame[got]) > 0).all()
    assert len(np.unique(r[r != GAP])) == len(t)  # cover: every row in some window
    w0 = r[0]  # frames 1..8 of v0: frame 7 has no crop, so position 6 is a masked gap
    assert w0[6] == GAP and t.frame[w0[5]] == 6 and t.frame[w0[7]] == 8
    assert not np.array_equal(epoch_order(len(plan), 0, 0), epoch_order(len(plan), 0, 1))


def test_a_video_shorter_than_the_window_is_padded(tmp_path):
    t = toy_table(tmp_path, n=5)
    plan = plan_windows(t.video, t.frame, t.rows_of("all"), length=8, stride=4, cover=True)
    assert len(plan) == 3
    assert ((plan.rows(np.arange(3)) != GAP).sum(1) == 5).all()


class _Echo(torch.nn.Module):
    """Outputs each position's first two features: overlap averaging must give the row's own."""

    def forward(self, x, mask):
        return {"va": x[..., :2]}


@pytest.mark.parametrize("batch_size", [1, 2, 50])
def test_evaluation_predicts_every_row_exactly_once(tmp_path, batch_size):
    t = toy_table(tmp_path, n=40)
    plan = plan_windows(t.video, t.frame, t.rows_of("all"), length=8, stride=3, cover=True)
    loader = WindowLoader(t.features, t.row_id, labels(len(t)), plan, batch_size=batch_size, train=False)
    model = TemporalModel(_Echo())
    seen, outs = [], []
    for batch in loader:
        seen.append(batch.row_id.numpy())
        outs.append(model(batch.images)["va"].numpy())
    seen = np.concatenate(seen)
    assert sorted(seen) == sorted(t.row_id)
    pos = np.argsort(t.row_id)[np.searchsorted(np.sort(t.row_id), seen)]
    np.testing.assert_allclose(np.concatenate(outs), t.features[pos, :2].astype(np.float32), atol=1e-6)


def test_training_batches_shuffle_windows_and_mask_gap_labels(tmp_path):
    t = toy_table(tmp_path)
    plan = plan_windows(t.video, t.frame, t.rows_of("train"), length=8, stride=4, cover=True)
    lab = labels(len(t))
    loader = WindowLoader(t.features, t.row_id, lab, plan, batch_size=2, train=True, seed=0)
    batch = next(iter(loader))
    assert batch.images.x.shape == (2, 8, t.dim) and len(batch) == int(batch.images.mask.sum()) > 0
    present = batch.images.mask.numpy().reshape(-1)
    assert (batch.va_mask.numpy() == present).all() and (batch.au_mask.numpy().any(1) == present).all()
    assert set(t.split[np.isin(t.row_id, batch.row_id.numpy())]) == {"train"}
    ids = batch.row_id.numpy()[present]
    pos = np.argsort(t.row_id)[np.searchsorted(np.sort(t.row_id), ids)]
    np.testing.assert_array_equal(batch.va.numpy()[present], lab.take(pos, np.ones(len(pos), bool))["va"].numpy())
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        orders.append(np.concatenate([b.row_id.numpy() for b in loader]))
    assert not np.array_equal(*orders)


def test_window_loader_starts_mid_epoch_like_the_shard_loaders(tmp_path):
    """``set_epoch(e, start_batch=k)`` (the shard loaders' EpochCursor): the rest of epoch ``e``
    from batch ``k``, the same batches as an uninterrupted pass; the next pass starts at 0."""
    from affpipe.loaders.base import BaseLoader
    from affpipe.loaders.plan import EpochCursor

    t = toy_table(tmp_path)
    plan = plan_windows(t.video, t.frame, t.rows_of("train"), length=8, stride=2, cover=True)
    loader = WindowLoader(t.features, t.row_id, labels(len(t)), plan, batch_size=2, train=True, seed=3)
    assert isinstance(loader, EpochCursor) and issubclass(BaseLoader, EpochCursor)
    assert loader.set_epoch.__func__ is BaseLoader.set_epoch  # one mechanism, not a copy
    loader.set_epoch(1)
    full = [b.row_id.numpy() for b in loader]
    assert len(full) == len(loader) >= 3
    for k in range(len(full) + 1):
        loader.set_epoch(1, start_batch=k)
        rest = [b.row_id.numpy() for b in loader]
        assert len(rest) == len(full) - k and all(np.array_equal(a, b) for a, b in zip(rest, full[k:], strict=True))
    assert len(list(loader)) == len(full)  # the start was consumed by one pass
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(full) + 1)


def test_too_few_windows_for_a_batch_names_the_flag(tmp_path):
    t = toy_table(tmp_path)
    plan = plan_windows(t.video, t.frame, t.rows_of("train"), length=8, stride=4, cover=True)
    with pytest.raises(ValueError, match="--batch-size"):
        WindowLoader(t.features, t.row_id, labels(len(t)), plan, batch_size=256, train=True)
