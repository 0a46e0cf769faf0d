"""README's "Python API" example runs as written (on the test world's index, shards and run)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs_and_says_what_run_model_returns(trained_world, capsys):
    code = _example()
    line = 'INDEX, SHARDS, RUN = "index", "shards/affwild2", "runs/mtl"'
    assert line in code
    w = trained_world
    code = code.replace(line, f'INDEX, SHARDS, RUN = {str(w / "index")!r}, {str(w / "shards")!r}, '
                              f'{str(w / "runs" / "frame")!r}')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["expr_prob"].sum(-1).allclose(scope["expr_prob"].new_ones(len(scope["expr_prob"])))
    assert scope["valence_arousal"].abs().max() <= 1 and scope["au_on"].dtype.is_floating_point is False
    assert "p_mtl" in scope["result"]
    from affpipe.runs.open import Run

    assert "logits" in Run.model.__doc__ and "raw outputs" in Run.model.__doc__
