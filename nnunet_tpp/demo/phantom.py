"""Moved to :mod:`nnunet_tpp.data.phantom` (the pretext probe uses it too, and data is below both); this name stays
so existing imports keep working."""
from nnunet_tpp.data.phantom import *  # noqa: F401,F403
