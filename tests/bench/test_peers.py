"""The peer loaders of ``make benchmark`` (WebDataset, LitData, FFCV): each yields uint8 batches
of the same train frames with exactly their label records; a missing peer becomes a row."""

from __future__ import annotations

import pytest
import torch

from affpipe.bench import peers


def _records(shard_dir) -> dict[int, bytes]:
    return {row: rec for row, _, rec in peers.train_samples(shard_dir)}


def _check(loader, shard_dir, batch_size: int, batches: int = 3) -> None:
    from affpipe.batch import decode_label_tensor
    from affpipe.labels import RECORD_SIZE

    truth = _records(shard_dir)
    seen: list[int] = []
    for _, b in zip(range(batches), loader, strict=False):
        assert b.images.dtype == torch.uint8 and tuple(b.images.shape) == (batch_size, 3, 112, 112)
        raw = b"".join(truth[row] for row in b.row_id.tolist())
        exp = decode_label_tensor(torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, RECORD_SIZE))
        for key in ("va", "expr", "au", "va_mask", "expr_mask", "au_mask"):
            assert torch.equal(exp[key], getattr(b, key)), key
        seen += b.row_id.tolist()
    assert len(seen) == len(set(seen)) == batches * batch_size


def _data(shard_dir, index_dir, tmp_path) -> peers.PeerData:
    return peers.PeerData(shards=shard_dir, index=index_dir, work=tmp_path / "peers")


def test_webdataset_peer(shard_dir, index_dir, tmp_path):
    loader = peers.build_wds(_data(shard_dir, index_dir, tmp_path), batch_size=8, workers=2, seed=0)
    _check(loader, shard_dir, 8)


def test_litdata_peer(shard_dir, index_dir, tmp_path):
    pytest.importorskip("litdata")
    data = _data(shard_dir, index_dir, tmp_path)
    info = peers.prepare_isolated("litdata", data, workers=1)
    assert info["samples"] == len(_records(shard_dir)) and info["convert_s"] > 0 and not info["reused"]
    assert peers.prepare_litdata(data, workers=1)["reused"]
    _check(peers.build_litdata(data, batch_size=8, workers=1, seed=0), shard_dir, 8)


@pytest.mark.slow  # numba compiles FFCV's pipeline (~10 s)
def test_ffcv_peer(shard_dir, index_dir, tmp_path):
    pytest.importorskip("ffcv")
    data = _data(shard_dir, index_dir, tmp_path)
    info = peers.prepare_isolated("ffcv", data, workers=1)
    assert info["samples"] == len(_records(shard_dir))
    _check(peers.build_ffcv(data, batch_size=8, workers=1, seed=0), shard_dir, 8)


def test_missing_peer_says_how_to_install(monkeypatch, shard_dir, index_dir, tmp_path):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(peers.PeerMissing, match=r"not installed.*\.\[bench\]"):
        peers.build_litdata(_data(shard_dir, index_dir, tmp_path), batch_size=8, workers=1, seed=0)
