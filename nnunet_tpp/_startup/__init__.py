"""Runs at interpreter start (from ``nnunet_tpp_ext_trainer.pth`` in site-packages) so the stock
``nnUNetv2_train`` / ``nnUNetv2_predict`` find our trainers with no manual step. It does two small things:

1. adds our trainer folder to ``nnUNet_extTrainer`` (nnU-Net's documented mechanism);
2. when nnU-Net's ``nnunetv2.utilities.find_objects`` is imported, wraps its trainer search so our trainer
   names resolve directly. nnU-Net otherwise imports every module of its own trainer package before it
   looks in ``nnUNet_extTrainer``, and one of them (``primus``) imports timm, which fails on CPU-only torch
   (no CPU torchvision). A name close to one of ours that no trainer file defines (a typo such as
   ``ConvAdaptorTrainer_S``) gets our error with the nearest names, before that crash can happen (see
   :func:`close_trainer_names`). Other names go to nnU-Net's search unchanged.

3. when ``nnunetv2.run.run_training`` is imported, wraps its ``run_training`` so that a call with one of our
   trainers is checked (:mod:`nnunet_tpp.trainers.preflight`: checkpoint kind and fit, recipe, target-parameter
   file, ``--c`` with ``-pretrained_weights``) before nnU-Net constructs the trainer, which creates the results
   folder: a refused ``nnUNetv2_train`` writes nothing and ends with our message, not a traceback.

It imports nothing heavy and never raises at start-up (the wrapped search raises nnU-Net's own error type
for a misspelt name of ours).
"""
import importlib.abc
import importlib.machinery
import os
import sys

VARIABLE = "nnUNet_extTrainer"
_FIND_OBJECTS = "nnunetv2.utilities.find_objects"
_RUN_TRAINING = "nnunetv2.run.run_training"


def trainer_dir() -> str:
    """The folder nnU-Net must search for our trainer names."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainers", "nnunet_ext")


def _add_trainer_dir() -> None:
    folder = trainer_dir()
    current = [p for p in os.environ.get(VARIABLE, "").split(os.pathsep) if p]
    if folder not in current:
        os.environ[VARIABLE] = os.pathsep.join(current + [folder])


def _defined_outside_ours(trainer_name: str, nnunet_root: str | None) -> bool:
    """Whether a class of that name is defined in nnU-Net's trainer package or in a ``nnUNet_extTrainer``
    folder other than ours: a plain-text search of their ``.py`` files, importing nothing (importing them is
    what crashes on CPU torch)."""
    import re
    pattern = re.compile(rf"^\s*class\s+{re.escape(trainer_name)}\b", re.MULTILINE)
    roots = [os.path.join(nnunet_root, "training", "nnUNetTrainer")] if nnunet_root else []
    roots += [p for p in os.environ.get(VARIABLE, "").split(os.pathsep)
              if p and os.path.abspath(p) != trainer_dir()]
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                if name.endswith(".py"):
                    try:
                        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                            if pattern.search(f.read()):
                                return True
                    except OSError:
                        continue
    return False


def close_trainer_names(trainer_name: str, ours) -> list[str]:
    """Our trainer names that ``trainer_name`` is close to (best first); empty when it is not close.

    "Close" means a likely misspelling of one of our names, judged on lower-case names:
    (a) the same name in another case (``convadaptertrainer_s``);
    (b) a difflib similarity ratio of at least 0.8 (one or two wrong letters in a name of ~20 characters:
        ``ConvAdaptorTrainer_S`` scores 0.95, ``TPPConvAdapter`` 0.82);
    (c) it starts with one of our family names (``ConvAdapterTrainer_XL``, ``STUNetTrainer_5epochs``).
    nnU-Net's own names are not excluded here (``nnUNetTrainer`` scores 0.85 against ``STUNetTrainer``): the
    caller first checks that no such class exists outside our package.
    """
    import difflib
    lowered = {name.lower(): name for name in ours}
    query = trainer_name.lower()
    hits = difflib.get_close_matches(query, list(lowered), n=3, cutoff=0.8)
    if not hits:
        family = max((n.rsplit("_", 1)[0] for n in lowered if query.startswith(n.rsplit("_", 1)[0])),
                     key=len, default=None)
        if family:
            members = [n for n in lowered if n.rsplit("_", 1)[0] == family]
            hits = difflib.get_close_matches(query, members, n=3, cutoff=0.0)
    return [lowered[h] for h in hits]


def _wrap_trainer_search(module) -> None:
    original = module.recursive_find_trainer_class_by_name

    def recursive_find_trainer_class_by_name(trainer_name: str):
        try:
            from nnunet_tpp.trainers.zoo import TRAINERS
        except Exception:
            TRAINERS = {}
        if trainer_name in TRAINERS:
            return TRAINERS[trainer_name]
        close = close_trainer_names(trainer_name, TRAINERS) if TRAINERS else []
        if close:
            nnunet = sys.modules.get("nnunetv2")
            root = getattr(nnunet, "__path__", [None])[0]
            if not _defined_outside_ours(trainer_name, root):
                # nnU-Net's own error type and opening words, so scripts that match on them keep working
                raise RuntimeError(
                    f"Could not find requested nnunet trainer {trainer_name}: there is no such nnU-Net trainer, "
                    f"and it is not one of nnunet_tpp's. Did you mean {close[0]}?"
                    + (f" (Also close: {', '.join(close[1:])}.)" if len(close) > 1 else "")
                    + " Trainer names are case-sensitive; `nnunet-tpp trainers` lists all of nnunet_tpp's.")
        return original(trainer_name)

    recursive_find_trainer_class_by_name.__doc__ = original.__doc__
    recursive_find_trainer_class_by_name.nnunet_tpp_wrapped = True
    recursive_find_trainer_class_by_name.nnunet_original = original
    module.recursive_find_trainer_class_by_name = recursive_find_trainer_class_by_name


def _wrap_run_training(module) -> None:
    original = module.run_training
    import inspect
    signature = inspect.signature(original)

    def run_training(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            from nnunet_tpp.trainers.preflight import preflight
        except Exception:  # not the call we know: leave it to nnU-Net
            return original(*args, **kwargs)
        try:
            preflight(**bound.arguments)
        except ValueError as e:
            if os.path.basename(sys.argv[0]).startswith("nnUNetv2_train"):
                print(f"nnUNetv2_train: error (nnunet_tpp, nothing was written): {e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise
        return original(*args, **kwargs)

    run_training.__doc__ = original.__doc__
    run_training.nnunet_tpp_wrapped = True
    run_training.nnunet_original = original
    module.run_training = run_training


_WRAPPERS = {_FIND_OBJECTS: ("recursive_find_trainer_class_by_name", _wrap_trainer_search),
             _RUN_TRAINING: ("run_training", _wrap_run_training)}


class _TrainerSearchHook(importlib.abc.MetaPathFinder):
    """Finds the nnU-Net modules we wrap (:data:`_WRAPPERS`) like the normal path finder, then wraps them."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WRAPPERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_original = spec.loader.exec_module

        def exec_module(module):
            exec_original(module)
            try:
                _WRAPPERS[fullname][1](module)
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
        for name, (attribute, wrap) in _WRAPPERS.items():
            loaded = sys.modules.get(name)
            if loaded is not None and not getattr(getattr(loaded, attribute, None), "nnunet_tpp_wrapped", False):
                wrap(loaded)
    except Exception:  # never break interpreter start-up
        pass


register()
