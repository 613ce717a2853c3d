"""Moved to :mod:`nnunet_tpp.models.file_kinds` (checkpoint reading belongs to the models layer); this name stays
so existing imports keep working. Inside the package, import :mod:`nnunet_tpp.models.file_kinds`."""
from nnunet_tpp.models.file_kinds import *  # noqa: F401,F403
from nnunet_tpp.models.file_kinds import __all__  # noqa: F401
