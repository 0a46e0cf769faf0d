"""Loaders: every backend yields the source JPEGs (decoded, normalized) with exactly their labels;
augmentation happens at the configured rates; ranks split each epoch exactly; bad shards fail
clearly. Shards are written here (tiny, seeded) so the tests control corruption and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from affpipe.batch import normalize_uint8
from affpipe.labels import decode_records, encode_records
from affpipe.loaders import make_loader
from affpipe.loaders.augment import warp_nearest

SIZE = 112
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]


def _image(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    f = rng.uniform(0.02, 0.15, 3)
    img = 128 + 80 * np.sin(xx[..., None] * f + yy[..., None] * f[::-1] + rng.uniform(0, 6, 3))
    return img.clip(0, 255).astype(np.uint8)


def write_shards(out: Path, counts: dict[str, int], per_shard: int, seed: int = 0) -> dict:
    """Tiny shards in the shard helper's layout; returns {row_id: (rgb uint8 image, record)}."""
    import webdataset as wds

    from affpipe.shards.format import index_tar

    rng = np.random.default_rng(seed)
    truth, manifest, row = {}, {"schema_version": 1, "splits": {}}, 0
    for split, n in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        ids = np.arange(row, row + n)
        row += n
        va_valid, expr_valid = rng.random(n) < 0.8, rng.random(n) < 0.7
        rec = encode_records(
            ids, rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.integers(0, 8, n),
            np.where(rng.random((n, 12)) < 0.1, -1, rng.integers(0, 2, (n, 12))).astype(np.int8),
            va_valid, expr_valid, rng.random(n) < 0.9,
        )
        entries = []
        for s in range(0, n, per_shard):
            tar = out / split / f"{split}-{s // per_shard:06d}.tar"
            with wds.TarWriter(str(tar)) as w:
                for i in range(s, min(n, s + per_shard)):
                    ok, buf = cv2.imencode(".jpg", _image(rng)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
                    w.write({"__key__": f"{ids[i]:010d}", "jpg": buf.tobytes(), "lbl": rec[i].tobytes()})
                    truth[int(ids[i])] = (cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB), rec[i].tobytes())
            index_tar(tar, tar.with_suffix(".idx"))  # what DALI's wds2idx writes (tests/shards)
            entries.append({"file": f"{split}/{tar.name}", "index_file": f"{split}/{tar.stem}.idx",
                            "samples": min(n, s + per_shard) - s})
        manifest["splits"][split] = {"shards": entries, "samples": n}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return truth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("loader-shards")
    return out, write_shards(out, {"train": 240, "val": 70}, per_shard=50)


def _collect(loader) -> tuple[list, dict]:
    batches, aug = [], {"flip": [], "angle": []}
    for b in loader:
        batches.append(b)
        for k in aug:
            aug[k].append(loader.last_augment[k].clone())
    return batches, {k: torch.cat(v) for k, v in aug.items()}


def _check_labels(batch, truth) -> None:
    raw = torch.from_numpy(np.stack([np.frombuffer(truth[int(r)][1], np.uint8) for r in batch.row_id]))
    rec = decode_records(raw.numpy())
    assert torch.equal(batch.row_id, torch.from_numpy(rec["row_id"]))
    va_mask = torch.from_numpy(rec["flags"] & 1 > 0)
    assert torch.equal(batch.va_mask, va_mask)
    assert torch.equal(batch.expr_mask, torch.from_numpy(rec["flags"] & 2 > 0))
    exp_va = np.nan_to_num(np.stack([rec["valence"], rec["arousal"]], 1))
    assert torch.equal(batch.va, torch.from_numpy(exp_va))
    assert torch.equal(batch.expr[batch.expr_mask], torch.from_numpy(rec["expr"].astype(np.int64))[batch.expr_mask])
    au = torch.from_numpy(rec["au"].astype(np.int64))
    assert torch.equal(batch.au_mask, (au >= 0) & torch.from_numpy(rec["flags"] & 4 > 0)[:, None])
    assert torch.equal(batch.au[batch.au_mask], au[batch.au_mask].float())


def _expected(truth, row_ids, flips=None, angles=None) -> torch.Tensor:
    imgs = []
    for i, r in enumerate(row_ids.tolist()):
        img = truth[r][0]
        if flips is not None:
            img = warp_nearest(img, float(angles[i]), bool(flips[i]))
        imgs.append(img)
    return normalize_uint8(torch.from_numpy(np.stack(imgs)), channels_last=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_yields_source_images_and_labels_once(tiny, backend):
    out, truth = tiny
    loader = make_loader(out, "val", batch_size=16, train=False, backend=backend, num_workers=2)
    assert loader.backend == backend and len(loader) == 5 and loader.samples_per_epoch == 70
    batches, _ = _collect(loader)
    assert len(batches) == len(loader) and [len(b) for b in batches] == [16, 16, 16, 16, 6]
    rows = torch.cat([b.row_id for b in batches]).tolist()
    assert rows == sorted(truth)[240:]  # val: in order, each sample exactly once
    for b in batches:
        assert b.images.shape == (len(b), 3, SIZE, SIZE) and b.images.dtype == torch.float32
        _check_labels(b, truth)
        # libjpeg-turbo builds may differ by a few levels: <= 4/255 in normalized units
        diff = (b.images - _expected(truth, b.row_id)).abs() * 0.229 * 255
        assert float(diff.max()) <= 4.5, float(diff.max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_uint8_batches_normalized_by_the_model_equal_float_batches(tiny, backend, train):
    """``normalize=False`` (what the trainers use) + the model's input normalization gives exactly
    the float batch of ``normalize=True``: same samples, augmentation draws and arithmetic."""
    from affpipe.models.model import normalize_input

    out, _ = tiny
    split = "train" if train else "val"
    kw = dict(batch_size=16, train=train, backend=backend, seed=5, num_workers=0)
    floats, _ = _collect(make_loader(out, split, **kw))
    uint8s, _ = _collect(make_loader(out, split, normalize=False, **kw))
    assert len(floats) == len(uint8s) > 0
    for f, u in zip(floats, uint8s, strict=True):
        assert u.images.dtype == torch.uint8 and u.images.shape == f.images.shape
        assert torch.equal(u.row_id, f.row_id)
        assert torch.equal(normalize_input(u.images), f.images)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_augments_at_rates_and_keeps_labels(tiny, backend):
    out, truth = tiny
    loader = make_loader(out, "train", batch_size=16, train=True, backend=backend, seed=3, num_workers=2)
    assert len(loader) == 15 and loader.samples_per_epoch == 240
    batches, aug = _collect(loader)
    rows = torch.cat([b.row_id for b in batches])
    assert sorted(rows.tolist()) == list(range(240))  # 240 % 16 == 0: nothing dropped
    assert rows.tolist() != list(range(240))  # shuffled
    assert 0.3 < aug["flip"].float().mean() < 0.7
    assert float(aug["angle"].abs().max()) <= 10.0 and float(aug["angle"].std()) > 3.0
    for b in batches:
        _check_labels(b, truth)
    # the images are the source images flipped/rotated as reported (nearest-neighbour: a
    # different implementation may round a few boundary pixels the other way)
    b = batches[0]
    exp = _expected(truth, b.row_id, aug["flip"][:16], aug["angle"][:16])
    close = ((b.images - exp).abs() * 0.229 * 255 <= 4.5).float().mean()
    assert float(close) > 0.97, float(close)
    plain = _expected(truth, b.row_id)
    assert float(((b.images - plain).abs() * 0.229 * 255 <= 4.5).float().mean()) < 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_reshuffle_and_are_reproducible(tiny, backend):
    out, _ = tiny
    kw = dict(batch_size=32, train=True, backend=backend, seed=1, num_workers=1)
    a = make_loader(out, "train", **kw)
    e0 = torch.cat([b.row_id for b in a]).tolist()
    a.set_epoch(1)
    e1 = torch.cat([b.row_id for b in a]).tolist()
    assert len(e0) == len(e1) == 224 and e0 != e1  # 240 // 32 = 7 full batches
    b = make_loader(out, "train", **kw)
    b.set_epoch(1)
    assert torch.cat([x.row_id for x in b]).tolist() == e1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_cover_split_once(tiny, backend, train):
    out, truth = tiny
    split, n = ("train", 240) if train else ("val", 70)
    seen, lens = [], []
    for rank in range(2):
        loader = make_loader(out, split, batch_size=8, train=train, backend=backend, rank=rank,
                             world_size=2, num_workers=1, seed=5)
        loader.set_epoch(2)
        ids = torch.cat([b.row_id for b in loader]).tolist()
        assert len(ids) == loader.samples_per_epoch
        seen += ids
        lens.append(len(loader))
    assert sorted(seen) == sorted(truth)[:240] if train else sorted(seen) == sorted(truth)[240:]
    assert len(seen) == n and (lens[0] == lens[1] if train else True)


def test_backends_yield_same_row_ids(tiny):
    pytest.importorskip("nvidia.dali")
    out, _ = tiny
    sets = []
    for backend in ("torch", "dali"):
        loader = make_loader(out, "train", batch_size=8, train=True, backend=backend, rank=1, world_size=2,
                             num_workers=1, seed=7)
        loader.set_epoch(3)
        sets.append(sorted(torch.cat([b.row_id for b in loader]).tolist()))
    assert sets[0] == sets[1] and len(sets[0]) == 120


def test_auto_backend_and_bad_arguments(tiny):
    out, _ = tiny
    from affpipe._optional import dali_available

    loader = make_loader(out, "val", batch_size=8, train=False)
    assert loader.backend == "torch"  # on a CPU device auto picks the torch backend's threads
    if torch.cuda.is_available():
        loader = make_loader(out, "val", batch_size=8, train=False, device="cuda")
        assert loader.backend == ("dali" if dali_available() else "torch")
    with pytest.raises(ValueError, match="backend"):
        make_loader(out, "val", batch_size=8, train=False, backend="tf")
    with pytest.raises(ValueError, match="do not fill one batch"):
        make_loader(out, "val", batch_size=500, train=True, backend="torch")


# ---- bad shards ----------------------------------------------------------------------------


@pytest.fixture()
def bad_copy(tiny, tmp_path) -> Path:
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(tiny[0], out)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_idx(bad_copy, backend):
    (bad_copy / "val" / "val-000001.idx").unlink()
    with pytest.raises(ValueError, match=r"val-000001\.tar.*index.*missing"):
        make_loader(bad_copy, "val", batch_size=8, train=False, backend=backend)
    loader = make_loader(bad_copy, "val", batch_size=8, train=False, backend=backend, on_bad="skip")
    assert loader.skipped == {"missing_idx_shards": 1} and loader.samples_per_epoch == 50
    assert len(torch.cat([b.row_id for b in loader])) == 50


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tar(bad_copy, backend):
    tar = bad_copy / "val" / "val-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"val-000000\.tar: truncated .* sample 0000000\d\d\d"):
        make_loader(bad_copy, "val", batch_size=8, train=False, backend=backend)
    loader = make_loader(bad_copy, "val", batch_size=8, train=False, backend=backend, on_bad="skip")
    kept = loader.samples_per_epoch
    assert 0 < kept < 70 and loader.skipped["truncated"] == 70 - kept
    rows = torch.cat([b.row_id for b in loader])
    assert len(rows) == kept and len(set(rows.tolist())) == kept


def _corrupt_jpeg(out: Path, key: str) -> None:
    from affpipe.shards.format import parse_idx

    tar = out / "val" / "val-000000.tar"
    for comp in parse_idx(tar.with_suffix(".idx")):
        if comp["jpg"][2].startswith(key):
            off, n, _ = comp["jpg"]
            with open(tar, "r+b") as f:
                f.seek(off)
                f.write(b"\0" * n)  # same size: tar and index stay consistent, the JPEG is garbage


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_jpeg_names_shard_and_key(bad_copy, backend):
    _corrupt_jpeg(bad_copy, "0000000245")
    loader = make_loader(bad_copy, "val", batch_size=8, train=False, backend=backend, num_workers=1)
    with pytest.raises(ValueError, match=r"val-000000\.tar.*0000000245.*undecodable"):
        list(loader)


def test_undecodable_jpeg_skipped_and_counted(bad_copy):
    _corrupt_jpeg(bad_copy, "0000000245")
    loader = make_loader(bad_copy, "val", batch_size=8, train=False, backend="torch", on_bad="skip", num_workers=1)
    rows = torch.cat([b.row_id for b in loader]).tolist()
    assert 245 not in rows and len(rows) == 69 and loader.skipped == {"bad_sample": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_from_label_table(shard_dir, index_dir, backend):
    """index → shard → loader: every val row comes back once with exactly its table labels."""
    from affpipe.index.build import load_index
    from affpipe.labels import records_from_table
    from affpipe.shards.format import read_manifest

    table, _ = load_index(index_dir)
    by_row = {int(r["row_id"]): r.tobytes() for r in records_from_table(table)}
    loader = make_loader(shard_dir, "val", batch_size=32, train=False, backend=backend, num_workers=1)
    rows = []
    for b in loader:
        _check_labels(b, {r: (None, by_row[r]) for r in b.row_id.tolist()})
        rows += b.row_id.tolist()
    assert len(rows) == len(set(rows)) == read_manifest(shard_dir)["splits"]["val"]["samples"]


@pytest.mark.gpu
@pytest.mark.dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_gpu_matches_cpu_and_augments_on_the_gpu(tiny, train):
    """The GPU path (nvJPEG decode, flip+rotation warp on the GPU) yields the same samples and
    labels as the CPU path; without augmentation the images agree within nvJPEG's chroma
    upsampling differences, with it the draws it reports match the pixels it produced."""
    out, truth = tiny
    split = "train" if train else "val"
    kw = dict(batch_size=16, train=train, backend="dali", seed=1)
    gpu, aug = _collect(make_loader(out, split, device="cuda", **kw))
    cpu, _ = _collect(make_loader(out, split, device="cpu", **kw))
    assert all(b.images.is_cuda and b.va.is_cuda for b in gpu)
    ids = lambda bs: sorted(torch.cat([b.row_id.cpu() for b in bs]).tolist())  # noqa: E731
    assert ids(gpu) == ids(cpu)
    for b in gpu:
        _check_labels(b.to("cpu"), truth)
    if not train:
        for g, c in zip(gpu, cpu, strict=True):
            diff = (g.images.cpu() - c.images).abs() * 0.229 * 255
            assert float(diff.mean()) < 2.0 and float(diff.max()) < 40, (float(diff.mean()), float(diff.max()))
    else:
        assert 0.25 < float(aug["flip"].float().mean()) < 0.75
        assert float(aug["angle"].abs().max()) <= 10.0 and float(aug["angle"].std()) > 2.0
        b = gpu[0].to("cpu")
        exp = _expected(truth, b.row_id, aug["flip"][: len(b)], aug["angle"][: len(b)])
        close = ((b.images - exp).abs() * 0.229 * 255 <= 6).float().mean()
        assert float(close) > 0.9, float(close)  # nearest-neighbour warps agree but at ties
