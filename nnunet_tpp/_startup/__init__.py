"""Runs at interpreter start (from ``nnunet_tpp_ext_trainer.pth`` in site-packages) so the stock
``nnUNetv2_train`` / ``nnUNetv2_predict`` find our trainers with no manual step. It does two small things:

1. adds our trainer folder to ``nnUNet_extTrainer`` (nnU-Net's documented mechanism);
2. when nnU-Net's ``nnunetv2.utilities.find_objects`` is imported, wraps its trainer search so our trainer
   names resolve directly. nnU-Net otherwise imports every module of its own trainer package before it
   looks in ``nnUNet_extTrainer``, and one of them (``primus``) imports timm, which fails on CPU-only torch
   (no CPU torchvision). Other names go to nnU-Net's search unchanged.

It imports nothing heavy and never raises.
"""
import importlib.abc
import importlib.machinery
import os
import sys

VARIABLE = "nnUNet_extTrainer"
_FIND_OBJECTS = "nnunetv2.utilities.find_objects"


def trainer_dir() -> str:
    """The folder nnU-Net must search for our trainer names."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainers", "nnunet_ext")


def _add_trainer_dir() -> None:
    folder = trainer_dir()
    current = [p for p in os.environ.get(VARIABLE, "").split(os.pathsep) if p]
    if folder not in current:
        os.environ[VARIABLE] = os.pathsep.join(current + [folder])


def _wrap_trainer_search(module) -> None:
    original = module.recursive_find_trainer_class_by_name

    def recursive_find_trainer_class_by_name(trainer_name: str):
        try:
            from nnunet_tpp.trainers.zoo import TRAINERS
        except Exception:
            TRAINERS = {}
        if trainer_name in TRAINERS:
            return TRAINERS[trainer_name]
        return original(trainer_name)

    recursive_find_trainer_class_by_name.__doc__ = original.__doc__
    recursive_find_trainer_class_by_name.nnunet_tpp_wrapped = True
    module.recursive_find_trainer_class_by_name = recursive_find_trainer_class_by_name


class _TrainerSearchHook(importlib.abc.MetaPathFinder):
    """Finds ``nnunetv2.utilities.find_objects`` like the normal path finder, then wraps its search."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _FIND_OBJECTS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_original = spec.loader.exec_module

        def exec_module(module):
            exec_original(module)
            try:
                _wrap_trainer_search(module)
            except Exception:
                pass

        spec.loader.exec_module = exec_module
        return spec


def register() -> None:
    """Installs both mechanisms (idempotent)."""
    try:
        _add_trainer_dir()
        if not any(isinstance(f, _TrainerSearchHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _TrainerSearchHook())
        loaded = sys.modules.get(_FIND_OBJECTS)
        if loaded is not None and not getattr(loaded.recursive_find_trainer_class_by_name,
                                              "nnunet_tpp_wrapped", False):
            _wrap_trainer_search(loaded)
    except Exception:  # never break interpreter start-up
        pass


register()
