"""The pre-training loader: every frame of the chosen splits, views deterministic and resumable."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from affpipe.loaders.factory import make_pretrain_loader
from affpipe.loaders.pretrain import PretrainData, PretrainLoader
from affpipe.loaders.views import ViewConfig, color_matrices, draw_view, draw_views, render_view
from affpipe.shards.unlabelled import frame_counts

TWO = (ViewConfig(), ViewConfig(blur_p=1.0, solarize_p=0.2))  # asymmetric views, BYOL-style


def _epoch(loader, epoch: int, start: int = 0):
    loader.set_epoch(epoch, start_batch=start)
    return [([v.clone() for v in b.views], b.row_id.clone()) for b in loader]


def test_every_frame_of_train_labelled_or_not_once_per_epoch(shard_dir):
    loader = PretrainLoader(shard_dir, PretrainData(), views=TWO, batch_size=16, seed=1, num_workers=2)
    counts = frame_counts(shard_dir)["train"]
    assert counts["unlabelled"] > 0 and loader.total == counts["labelled"] + counts["unlabelled"]
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == loader.total // 16
    ids = torch.cat([r for _, r in batches]).numpy()
    assert len(np.unique(ids)) == len(ids) == len(loader) * 16  # drop-last only, no repeats
    for views, _ in batches[:2]:
        assert len(views) == 2 and all(v.shape == (16, 3, 112, 112) and v.dtype == torch.uint8 for v in views)
        assert not torch.equal(views[0], views[1])
    loader.close()


def test_views_are_deterministic_across_loaders_and_resume_at_batch_k(shard_dir):
    a = PretrainLoader(shard_dir, PretrainData(), views=TWO, batch_size=16, seed=4, num_workers=2)
    b = PretrainLoader(shard_dir, PretrainData(), views=TWO, batch_size=16, seed=4, num_workers=1)
    full, again, rest = _epoch(a, 2), _epoch(b, 2), _epoch(b, 2, start=3)
    for x, y in zip(full, again, strict=True):
        assert torch.equal(x[1], y[1]) and all(torch.equal(p, q) for p, q in zip(x[0], y[0], strict=True))
    assert len(rest) == len(full) - 3
    for x, y in zip(full[3:], rest, strict=True):
        assert torch.equal(x[1], y[1]) and all(torch.equal(p, q) for p, q in zip(x[0], y[0], strict=True))
    other = _epoch(a, 3)
    assert not torch.equal(other[0][1], full[0][1])  # another epoch, another order
    a.close(), b.close()


def test_split_choice_is_recorded_and_val_needs_force(shard_dir):
    with pytest.raises(ValueError, match="allow_val"):
        PretrainData(splits=("train", "val"))
    assert PretrainData(splits=("train", "val"), allow_val=True).splits == ("train", "val")
    with pytest.raises(ValueError, match="distinct splits"):
        PretrainData(splits=("train", "train"))
    assert not PretrainData().transductive and PretrainData(splits=("train", "test")).transductive
    plain = PretrainLoader(shard_dir, PretrainData(), views=TWO, batch_size=8, num_workers=1)
    trans = PretrainLoader(shard_dir, PretrainData(splits=("train", "test")), views=TWO, batch_size=8, num_workers=1)
    assert trans.total == plain.total + frame_counts(shard_dir)["test"]["unlabelled"]
    with pytest.raises(ValueError, match="backend"):
        make_pretrain_loader(shard_dir, PretrainData(), views=TWO, batch_size=8, backend="nope")


def test_identity_view_is_the_decoded_frame_and_flip_mirrors_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (112, 112, 3), np.uint8)
    plain = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    out = np.empty_like(image)
    for flip, want in ((0.0, image), (1.0, image[:, ::-1])):
        p = draw_view(rng, 2, (112, 112), ViewConfig(flip_p=flip, **plain))
        render_view(image, p, 0, color_matrices(p)[0], out)
        assert np.array_equal(out, want)
    p = draw_view(rng, 2, (112, 112), ViewConfig(**{**plain, "grayscale_p": 1.0}))
    render_view(image, p, 0, color_matrices(p)[0], out)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(int)
    assert np.abs(out.astype(int) - grey[..., None]).max() <= 1


def test_draws_depend_only_on_seed_batch_and_view():
    one = draw_views(7, 3, 32, (112, 112), TWO)
    two = draw_views(7, 3, 32, (112, 112), TWO)
    assert all(np.array_equal(a.box, b.box) and np.array_equal(a.jitter, b.jitter) for a, b in zip(one, two, strict=True))
    assert not np.array_equal(one[0].box, one[1].box)
    assert not np.array_equal(one[0].box, draw_views(7, 4, 32, (112, 112), TWO)[0].box)
    box = one[0].box
    assert (box[:, 0] >= 0).all() and (box[:, 0] + box[:, 2] <= 112).all() and (box[:, 2] * box[:, 3] >= 0.2 * 112 * 112 * 0.9).all()
    with pytest.raises(ValueError, match="views.scale"):
        ViewConfig(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="unknown key"):
        ViewConfig.from_dict({"blur": 1})


def test_describe_data_is_what_a_run_records(shard_dir):
    from affpipe.loaders.pretrain import describe_data

    d = describe_data(shard_dir, PretrainData())
    assert d["splits"] == ["train"] and not d["transductive"] and d["frames"]["train"]["unlabelled"] > 0
    assert d["unlabelled_note"] is None and isinstance(d["fingerprint"], str)
    assert describe_data(shard_dir, PretrainData(splits=("train", "test")))["transductive"]


def test_transductive_without_test_shards_names_the_command(index_dir, tmp_path):
    from affpipe.shards.write import ShardConfig, write_shards

    write_shards(ShardConfig(index=index_dir, out=tmp_path / "t", split="train", samples_per_shard=100, workers=1))
    with pytest.raises(ValueError, match=r"no test shards .*affpipe shard --split test"):
        PretrainLoader(tmp_path / "t", PretrainData(splits=("train", "test")), views=TWO, batch_size=8)


def test_an_undecodable_frame_is_named_or_skipped_and_counted(shard_dir, tmp_path):
    import shutil

    from affpipe.shards.format import idx_member_arrays, shard_paths

    out = tmp_path / "bad"
    shutil.copytree(shard_dir, out)
    tar, idx = shard_paths(out, "train")[0]
    off, size = (int(v) for v in idx_member_arrays(idx)["jpg"][0])
    data = bytearray(tar.read_bytes())
    data[off:off + size] = bytes(size)  # not a JPEG any more
    tar.write_bytes(bytes(data))
    strict = PretrainLoader(out, PretrainData(), views=TWO, batch_size=16, num_workers=1)
    with pytest.raises(ValueError, match=r"train-000000\.tar: sample \d{10}: missing, undecodable"):
        list(strict)
    lenient = PretrainLoader(out, PretrainData(), views=TWO, batch_size=16, num_workers=1, on_bad="skip")
    sizes = [len(b) for b in lenient]
    assert lenient.skipped == {"bad_sample": 1} and sorted(sizes)[0] == 15 and sum(sizes) == 16 * len(lenient) - 1
    strict.close(), lenient.close()
