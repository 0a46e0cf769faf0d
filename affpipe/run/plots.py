"""``curves.png``: training loss and validation scores against epochs, from ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from affpipe.run.checkpoint import read_metrics

_SCORE_LABELS = {
    "va_ccc": "VA CCC (mean)", "valence_ccc": "valence CCC", "arousal_ccc": "arousal CCC",
    "expr_f1": "EXPR macro F1", "au_f1": "AU macro F1", "p_mtl": "P_MTL / 3",
}


def plot_curves(metrics: Path, png: Path, *, title: str = "") -> Path:
    """Draw train loss (per logged step and per epoch, with its parts) and validation scores."""
    records = read_metrics(metrics)
    steps = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)

    if steps:
        x = [r["epoch"] + r["step_in_epoch"] / max(r["steps_in_epoch"], 1) for r in steps]
        ax_loss.plot(x, [r["loss"] for r in steps], color="0.7", lw=1, label="loss (logged steps)")
    if epochs:
        x = [r["epoch"] + 1 for r in epochs]
        parts = sorted({k for r in epochs for k in r if k.startswith("train_loss")})
        for key in parts:
            label = "loss (epoch mean)" if key == "train_loss" else key.removeprefix("train_") + " (epoch mean)"
            ax_loss.plot(x, [r.get(key, float("nan")) for r in epochs], marker="o",
                         lw=2 if key == "train_loss" else 1.2, label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_loss.grid(alpha=0.3)
    if steps or epochs:
        ax_loss.legend(fontsize=8)

    validated = [r for r in epochs if r.get("val")]
    if validated:
        x = [r["epoch"] + 1 for r in validated]
        for key, label in _SCORE_LABELS.items():
            if key not in validated[0]["val"]:
                continue
            scale = 1 / 3 if key == "p_mtl" else 1.0  # P_MTL sums three metrics in [0, 1]
            ax_val.plot(x, [r["val"].get(key, float("nan")) * scale for r in validated], marker="o",
                        lw=2 if key in ("p_mtl", validated[0].get("score_key")) else 1.2, label=label)
        ax_val.legend(fontsize=8)
    ax_val.set(xlabel="epoch", ylabel="score", title="Validation")
    ax_val.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    png = Path(png)
    fig.savefig(png)
    return png
