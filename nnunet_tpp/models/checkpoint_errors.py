"""The errors of reading a checkpoint file for a network, shared by every checkpoint loader of the package."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for the requested network."""


class ViTCheckpointError(CheckpointError):
    """A file that is not a usable ViT checkpoint, or one that does not fit the model (a ValueError)."""
