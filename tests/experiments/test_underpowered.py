"""The grid's twin is many short videos, enough validation recordings for the intervals; a report
question resting on fewer than intervals.MIN_RECORDINGS says it is under-powered (issue 25)."""

from __future__ import annotations

import re
from pathlib import Path

from support import fake_run

from affpipe.scoring.intervals import MIN_RECORDINGS


def test_grid_twin_is_many_short_videos_at_the_old_frame_budget():
    from affpipe.experiments.grid import load_grid

    grid = load_grid()
    videos, frames = grid.synthetic["videos"], grid.synthetic["frames"]
    # 600 x 10 measured exactly MIN_RECORDINGS (70) EXPR validation recordings; EXPR has the fewest
    assert videos >= 600 and frames <= 20 and videos * frames <= 8000
    for run in grid.runs:  # a temporal cell's window fits the twin's videos
        window = run.synthetic_overrides.get("temporal.window")
        if "temporal" in str(run.recipe):
            assert window is not None and window <= frames, run.name
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    demo_videos = int(re.search(r"^DEMO_VIDEOS \?= (\d+)", makefile, re.M).group(1))
    demo_frames = int(re.search(r"^DEMO_FRAMES \?= (\d+)", makefile, re.M).group(1))
    assert demo_videos >= 600 and demo_videos * demo_frames == 24 * 300


def test_report_says_a_question_is_under_powered_with_the_counts(tmp_path):
    from affpipe.experiments.compare import Resampler
    from affpipe.experiments.report import ReportConfig, write_report
    from affpipe.experiments.runs import load_run

    r = tmp_path / "runs"
    paths = [fake_run(r, "uni_expr", "expr", seed=3, predictions=True, videos=8),
             fake_run(r, "mtl_random", "mtl", seed=5, predictions=True, videos=8)]
    rs = Resampler([load_run(p) for p in paths], resamples=50)
    line = rs.underpowered()
    assert line.startswith("**Under-powered:**") and "EXPR 8" in line and str(MIN_RECORDINGS) in line
    md = write_report(ReportConfig(runs=tuple(paths), out=tmp_path / "rep")).read_text()
    assert "**Under-powered:**" in md
    rs.per_task = {t: {**c, "units": MIN_RECORDINGS} for t, c in rs.per_task.items()}
    assert rs.underpowered() == ""
