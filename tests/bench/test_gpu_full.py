"""``make benchmark-gpu-full`` on a CPU: the same stages on a tiny tree, in a process where click
and matplotlib cannot be imported (a bare GPU host has neither)."""

from __future__ import annotations

import json
import subprocess
import sys

BARE = "import sys; sys.modules['click'] = None; sys.modules['matplotlib'] = None; "


def test_gpu_full_cpu_smoke(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n<!-- bench-gpu-full:start -->\nNot measured yet.\n<!-- bench-gpu-full:end -->\n")
    code = BARE + "from affpipe.bench.gpu_full import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "g"), "--cpu-smoke", "--markdown", str(md)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "g" / "results.json").read_text())
    e, d = r["epoch"], r["data"]
    assert e["whole_epoch"] and e["steps"] >= 1 and e["frames"] == e["steps"] * r["config"]["batch_size"]
    assert e["frames"] <= d["train_samples"] and e["fps"] > 0 and 0.0 <= e["data_wait_share"] <= 1.0
    assert set(d["setup_s"]) == {"synth_s", "index_s", "shard_s"}
    section = md.read_text().split("<!-- bench-gpu-full:start -->")[1]
    assert "Not measured yet" not in section and "one epoch" in section and "Waiting for data" in section
    assert "one epoch" in proc.stdout
