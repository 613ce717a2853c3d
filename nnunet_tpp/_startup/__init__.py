"""Runs at interpreter start (from ``nnunet_tpp_ext_trainer.pth`` in site-packages): adds our trainer folder
to ``nnUNet_extTrainer`` so the stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` find our trainers.

It only edits one environment variable and imports nothing heavy; it never raises.
"""
import os

VARIABLE = "nnUNet_extTrainer"


def trainer_dir() -> str:
    """The folder nnU-Net must search for our trainer names."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainers", "nnunet_ext")


def register() -> None:
    """Appends :func:`trainer_dir` to ``nnUNet_extTrainer`` unless it is already listed."""
    try:
        folder = trainer_dir()
        current = [p for p in os.environ.get(VARIABLE, "").split(os.pathsep) if p]
        if folder not in current:
            os.environ[VARIABLE] = os.pathsep.join(current + [folder])
    except Exception:  # never break interpreter start-up
        pass


register()
