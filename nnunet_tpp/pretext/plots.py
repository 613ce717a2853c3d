"""Reports of the pretext stages: the per-epoch diagnostics file and the progress plots (DINO: loss, KL and the
collapse entropies; masked reconstruction: the loss against the loss of predicting the mean)."""
from __future__ import annotations

import json
import os


def write_diagnostics(history: list[dict], path: str) -> None:
    """``tpp_diagnostics.json``: the list of per-epoch diagnostics (one dict per epoch), written atomically."""
    write_json(history, path)


def write_json(data, path: str) -> None:
    """Writes ``data`` as JSON to ``path`` atomically (a temporary file, then renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def plot_progress(history: list[dict], path: str) -> None:
    """A PNG of the pretext stage per epoch: DINO loss and student-teacher KL; teacher entropy and batch-mean
    entropy against log K (collapse: entropy near log K, or batch-mean entropy near 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(epochs, [r["loss"] for r in history], "b-o", linewidth=2, label="DINO loss")
    ax1.plot(epochs, [r["kl"] for r in history], "g--", label="KL(teacher || student)")
    ax1.set(xlabel="pretext epoch", ylabel="nats", title="TPP pretext stage (DINO, target parameters only)")
    ax2.plot(epochs, [r["teacher_entropy"] for r in history], "r-o", label="teacher entropy (per view)")
    ax2.plot(epochs, [r["batch_mean_entropy"] for r in history], "k-s", label="batch-mean teacher entropy")
    ax2.axhline(history[-1]["log_k"], color="grey", linestyle=":", label="log K (uniform)")
    ax2.set(xlabel="pretext epoch", ylabel="nats", title="collapse diagnostics")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(losses: list[float], path: str, objective: str = "DINO") -> None:
    """A PNG of a pretext loss per epoch, like nnU-Net's progress.png (the MAE stage's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="b", marker="o", linewidth=2)
    ax.set_xlabel("pretext epoch")
    ax.set_ylabel(f"{objective} loss")
    ax.set_title(f"TPP pretext stage ({objective}, target parameters only)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_masked(history: list[dict], path: str) -> None:
    """A PNG of the masked-reconstruction stage per epoch: the loss on the masked voxels and the loss of predicting
    the view's mean there (0 for z-scored data: what a network that learned nothing scores)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(epochs, [r["loss"] for r in history], "b-o", linewidth=2, label="masked-voxel MSE")
    ax.plot(epochs, [r["mean_prediction_loss"] for r in history], "k--", label="MSE of predicting 0 (the mean)")
    ax.set(xlabel="pretext epoch", ylabel="MSE", title="TPP pretext stage (masked reconstruction)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
