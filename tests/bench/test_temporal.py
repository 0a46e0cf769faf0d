from affpipe.bench.temporal import bench_epoch, make_random_table
from affpipe.temporal.features import read_table


def test_bench_epoch_on_a_small_random_table(tmp_path):
    feats = make_random_table(tmp_path / "data", rows=3000, videos=6, dim=16)
    t = read_table(feats)
    assert 0.9 * 3000 < len(t) < 3000 and t.dim == 16  # ~2% of the frames have no crop
    r = bench_epoch(feats, tmp_path / "run", window=16, stride=16, batch_size=8, hidden=16, layers=1, max_steps=3)
    assert r["steps_measured"] == 3 and r["steps_per_epoch"] > 3 and r["epoch_train_s_extrapolated"] > 0
    assert r["peak_rss_anon_gib"] > 0 and 0 <= r["data_wait_share"] <= 1
