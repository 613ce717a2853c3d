"""What kind of file is this? Names a weights file without unsafe unpickling, so a file of the wrong kind is
refused as such ("this is a target-parameter file, not a backbone checkpoint") rather than with a loader's
KeyError or torch's own advice.

Files are read with ``torch.load(weights_only=True)`` and the numpy allow-list of :func:`numpy_allow_list`;
nothing else is ever unpickled, and no message here suggests turning that off. Kinds (the ``kind`` of a :class:`FileKind`):

* ``ADAPTER``: an nnunet_tpp adapter file (``peft_weights.pth``; ``"format": "nnunet_tpp.peft/N"``);
* ``TARGET_PARAMETERS``: a TPP target-parameter file (``"format": "nnunet_tpp.tpp/N"``);
* ``NNUNET_TPP_OTHER``: another nnunet_tpp file (an SSA result, a resumable pretext state, ...);
* ``STUNET``: an STU-Net checkpoint: nnU-Net v1 ``.model`` (``state_dict``), v2 ``.pth``
  (``network_weights``, also our trainers' own checkpoints), or a plain STU-Net state dict;
* ``NNUNET_CHECKPOINT``: an nnU-Net v2 training checkpoint of another network (``network_weights`` +
  ``init_args`` / ``trainer_name``);
* ``STATE_DICT``: the weights of another network (a plain state dict, or one under a usual key);
* ``REFUSED``: holds pickled objects outside the allow-list; it was not unpickled;
* ``NOT_TORCH``: not a PyTorch file at all (text, NIfTI, ZIP, plain pickle, empty, corrupt, ...);
* ``MISSING``: no such file (or a folder);
* ``OTHER``: a PyTorch file holding something else (a bare tensor, a list, a dict without weights).
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from nnunet_tpp.models.stunet import STUNET_MARKER, describe_stunet

ADAPTER, TARGET_PARAMETERS, NNUNET_TPP_OTHER = "adapter", "target_parameters", "nnunet_tpp_other"
STUNET, NNUNET_CHECKPOINT, STATE_DICT = "stunet_checkpoint", "nnunet_checkpoint", "state_dict"
REFUSED, NOT_TORCH, MISSING, OTHER = "refused", "not_torch", "missing", "other"
#: The kinds written by nnunet_tpp itself.
NNUNET_TPP_KINDS = (ADAPTER, TARGET_PARAMETERS, NNUNET_TPP_OTHER)

#: Format prefixes (any version) of nnunet_tpp.peft.api.FILE_FORMAT and nnunet_tpp.pretext.stage.TARGET_FORMAT.
ADAPTER_FORMAT_PREFIX, TARGET_FORMAT_PREFIX = "nnunet_tpp.peft/", "nnunet_tpp.tpp/"
TARGET_ENV = "NNUNET_TPP_TARGET_PARAMETERS"
__all__ = ["ADAPTER", "ADAPTER_FORMAT_PREFIX", "MISSING", "NNUNET_CHECKPOINT", "NNUNET_TPP_KINDS", "NNUNET_TPP_OTHER",
           "NOT_TORCH", "OTHER", "REFUSED", "STATE_DICT", "STUNET", "TARGET_ENV", "TARGET_FORMAT_PREFIX",
           "TARGET_PARAMETERS", "FileKind", "FileKindError", "classify", "identify", "load_expected", "load_torch_file",
           "numpy_allow_list", "read", "wrong_kind_message"]

_EXPECTED = {
    STUNET: ("a backbone checkpoint", "a published STU-Net checkpoint (nnU-Net v1 .model or v2 .pth)"),
    TARGET_PARAMETERS: ("a target-parameter file", "a target-parameter file (written by `nnunet-tpp pretrain -o "
                                                   "FILE`, or a TPP run's fold folder: tpp_target_parameters.pth)"),
    ADAPTER: ("an adapter file", "an nnunet_tpp adapter file (peft_weights.pth in a fine-tuned fold folder)"),
    NNUNET_CHECKPOINT: ("an nnU-Net checkpoint", "an nnU-Net v2 training checkpoint (checkpoint_final.pth / "
                                                 "checkpoint_best.pth) or an nnssl pre-training checkpoint"),
}
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save(_use_new_zipfile_serialization=False)
_PREFIXES = ("module.", "_orig_mod.")


def numpy_allow_list() -> list:
    """The classes ``torch.load(weights_only=True)`` may rebuild besides tensors: the numpy objects that nnU-Net v1
    checkpoints pickle (scalars and small arrays in ``plot_stuff``), under both the numpy 1 and numpy 2 module
    paths. Returns a list for ``torch.serialization.safe_globals``."""
    core = np._core if hasattr(np, "_core") else np.core
    allowed = [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool", "uint8")]
    aliases = [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
               (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    return allowed + aliases


class FileKindError(ValueError):
    """A file of another kind than the one expected; the message names both and what to pass instead."""


@dataclass(frozen=True)
class FileKind:
    """What a file is.

    Attributes:
        kind: one of the module's kind constants (``STUNET``, ``TARGET_PARAMETERS``, ...).
        path: the file.
        description: a noun phrase for messages, e.g. ``"an STU-Net-S checkpoint (nnU-Net v1 .model: state_dict)"``.
        details: what was read on the way (``format``, ``architecture``, ``method``, ``trainer_name``, ``globals``).
    """

    kind: str
    path: str
    description: str
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.path}: {self.description}"


def identify(path: str | os.PathLike) -> FileKind:
    """Says what kind of file ``path`` is. Never raises for the file's content; a ZIP-format PyTorch file is
    memory-mapped, so a checkpoint of several GB is not read into memory. ``argparse.Namespace`` (the
    ``args`` of official MAE / DINO checkpoints, which the ViT loader accepts) is allowed too, so that such a
    checkpoint is named as the ViT it is."""
    import argparse
    return read(path, mmap=True, also_allow=(argparse.Namespace,))[1]


def read(path: str | os.PathLike, mmap: bool = False, map_location="cpu",
         also_allow: tuple = ()) -> tuple[object | None, FileKind]:
    """Reads a file safely (``weights_only=True`` with the numpy allow-list) and classifies it.

    Args:
        path: any file.
        mmap: memory-map the tensors of a ZIP-format PyTorch file instead of reading them (ignored for the
            legacy format).
        map_location: as for ``torch.load``.
        also_allow: further plain-data classes to allow besides the numpy allow-list.
    Returns:
        ``(content, kind)``; ``content`` is None when the file was not unpickled (missing, not a PyTorch
        file, refused).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None, FileKind(MISSING, path, "a path that does not exist")
    if os.path.isdir(path):
        return None, FileKind(MISSING, path, "a folder, not a file")
    container, not_torch = _sniff(path)
    if not_torch is not None:
        return None, FileKind(NOT_TORCH, path, not_torch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols
            with torch.serialization.safe_globals(numpy_allow_list() + list(also_allow)):
                obj = torch.load(path, map_location=map_location, weights_only=True,
                                 mmap=mmap and container == "zip")
    except pickle.UnpicklingError as e:
        found = sorted(set(re.findall(r"\bGLOBAL ([\w.]+)", str(e))))
        if found:
            return None, FileKind(REFUSED, path, f"a file with pickled objects outside the allow-list of a weights "
                                                 f"file ({', '.join(found)}); it was not unpickled",
                                  {"globals": found})
        operand = re.search(r"Unsupported operand (\d+)", str(e))
        what = f"unsupported pickle instruction {operand.group(1)}" if operand else _clean(e)
        return None, FileKind(REFUSED, path, f"a file the weights-only reader refused ({what}); it was not "
                                             f"unpickled", {"globals": []})
    except Exception as e:  # zip/pickle corruption, truncated files, ...
        return None, FileKind(NOT_TORCH, path, f"a corrupt or unknown file ({type(e).__name__}: {_clean(e)})")
    return obj, classify(obj, path)


def classify(obj: object, path: str = "") -> FileKind:
    """Classifies the content of a PyTorch file (as returned by :func:`read`)."""
    if not isinstance(obj, dict):
        what = (f"a single tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor)
                else f"a {type(obj).__name__}")
        return FileKind(OTHER, path, f"{what}, not a checkpoint dictionary")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("nnunet_tpp."):
        details = {k: obj.get(k) for k in ("method", "options", "architecture", "trainer_name") if k in obj}
        details["format"] = fmt
        made = _identity_text(obj)
        if fmt.startswith(ADAPTER_FORMAT_PREFIX):
            return FileKind(ADAPTER, path, f"an nnunet_tpp adapter file ({fmt}{made})", details)
        if fmt.startswith(TARGET_FORMAT_PREFIX):
            return FileKind(TARGET_PARAMETERS, path, f"an nnunet_tpp target-parameter file ({fmt}{made})", details)
        return FileKind(NNUNET_TPP_OTHER, path, f"an nnunet_tpp file of format {fmt}", details)
    if {"student", "teacher", "epoch"} <= set(obj):
        return FileKind(NNUNET_TPP_OTHER, path, "a resumable pretext-stage state of nnunet_tpp (tpp_state.pth or "
                                                "ssa_state.pth)", {"format": "state"})
    trainer = obj.get("trainer_name")
    for key, container in (("network_weights", "nnU-Net v2 .pth: network_weights"),
                           ("state_dict", "nnU-Net v1 .model: state_dict")):
        weights = obj.get(key)
        if not (isinstance(weights, dict) and weights and _all_tensors(weights)):
            continue
        arch = _architecture(weights)
        details = {"format": container, "architecture": arch, "trainer_name": trainer}
        by = f", trainer {trainer}" if trainer else ""
        if "STU-Net" in arch and not arch.startswith("not"):
            return FileKind(STUNET, path, f"{_stunet_phrase(arch)} ({container}{by})", details)
        if key == "network_weights" and ("init_args" in obj or trainer):
            network = _network_class(obj) or arch
            details["network"] = network
            return FileKind(NNUNET_CHECKPOINT, path, f"an nnU-Net v2 training checkpoint of another network "
                                                     f"({network}{by})", details)
        return FileKind(STATE_DICT, path, f"the weights of another network, {arch} ({container})", details)
    if obj and _all_tensors(obj):
        arch = _architecture(obj)
        details = {"format": "state dict", "architecture": arch}
        if "STU-Net" in arch and not arch.startswith("not"):
            return FileKind(STUNET, path, f"{_stunet_phrase(arch)} (a plain state dict)", details)
        return FileKind(STATE_DICT, path, f"a plain state dict of another network, {arch}", details)
    for key in ("model", "teacher", "student", "module", "state_dict_ema", "model_ema"):
        weights = obj.get(key)
        if isinstance(weights, dict) and weights and _all_tensors(weights):
            arch = _architecture(weights)
            return FileKind(STATE_DICT, path, f"the weights of another network under {key!r}, {arch}",
                            {"format": key, "architecture": arch})
    keys = sorted(str(k) for k in obj)
    return FileKind(OTHER, path, f"a dictionary without network weights (keys {keys[:8]})", {"keys": keys})


def wrong_kind_message(found: FileKind, expected: str, role: str | None = None) -> str:
    """The refusal of a file of kind ``found`` where a file of kind ``expected`` (``STUNET``,
    ``TARGET_PARAMETERS`` or ``ADAPTER``) was needed, naming what it is and what to pass instead.

    Args:
        role: how the file was given, e.g. ``"-pretrained_weights"`` or ``"NNUNET_TPP_TARGET_PARAMETERS"``.
    """
    short, noun = _EXPECTED[expected]
    where = f"{found.path!r}" + (f" (given as {role})" if role else "")
    if found.kind == expected:
        return f"{where} is {found.description}."
    if found.kind == MISSING:
        return f"{'checkpoint' if expected == STUNET else short.split(' ', 1)[1]} not found: {where} is " \
               f"{found.description}. Pass the path of {noun}."
    if found.kind == NOT_TORCH:
        return f"{where} is not a readable PyTorch checkpoint: it is {found.description}. Expected {noun}."
    if found.kind == REFUSED:
        return (f"{where} holds objects outside the allow-list of a weights file (tensors, numbers, numpy scalars)"
                + (f": {', '.join(found.details['globals'])}" if found.details.get("globals") else "")
                + f"; it was not unpickled, because loading it could run code stored in it. Expected {noun}. If you "
                  f"trust its source, re-save only its tensors in the program that wrote it (e.g. "
                  f"torch.save({{'network_weights': model.state_dict()}}, 'weights.pth')).")
    if found.kind == OTHER:
        return f"{where} holds {found.description}. Expected {noun}."
    return f"{where} is {found.description}, not {short}: {_fix(found, expected, noun)}."


def load_expected(path: str | os.PathLike, expected: str, role: str | None = None, mmap: bool = False,
                  map_location="cpu") -> dict:
    """Reads ``path`` safely and returns its content if it is of kind ``expected``.

    Args:
        path: the file given by the user.
        expected: ``STUNET``, ``TARGET_PARAMETERS`` or ``ADAPTER``.
        role: how it was given, for the message (``"NNUNET_TPP_TARGET_PARAMETERS"``, ``"-pretrained_weights"``).
        mmap: memory-map a ZIP-format file's tensors (for checks that only need names and shapes).
        map_location: as for ``torch.load``.
    Returns:
        The file's dictionary. Raises :class:`FileKindError` (a ``ValueError``) with
        :func:`wrong_kind_message` otherwise.
    """
    obj, found = read(path, mmap=mmap, map_location=map_location)
    if obj is None or found.kind != expected:
        raise FileKindError(wrong_kind_message(found, expected, role))
    return obj


def load_torch_file(path: str | os.PathLike, what: str, map_location="cpu") -> object:
    """``torch.load`` for files of no particular kind (nnunet_tpp's own resumable states and results): safe
    reading as in :func:`read`, and a refusal that says what the file is instead of torch's own text.

    Args:
        path: the file.
        what: what it should be, for the message (e.g. ``"the pretext stage's resumable state"``).
        map_location: as for ``torch.load``.
    Returns:
        The file's content. Raises :class:`FileKindError` when it is missing, not a PyTorch file, or refused.
    """
    obj, found = read(path, map_location=map_location)
    if obj is None:
        where = f"{found.path!r}"
        if found.kind == REFUSED:
            raise FileKindError(f"{where} holds objects outside the allow-list of a weights file "
                                f"({', '.join(found.details.get('globals') or []) or 'see the file'}); it was not "
                                f"unpickled. Expected {what}; remove or replace the file.")
        raise FileKindError(f"{where} is {found.description}, not {what}; remove or replace the file.")
    return obj


def _fix(found: FileKind, expected: str, noun: str) -> str:
    kind, details = found.kind, found.details
    if kind == TARGET_PARAMETERS:
        if expected == STUNET:
            return (f"pass it with {TARGET_ENV}={found.path}, and as -pretrained_weights the published STU-Net "
                    f"checkpoint it was pre-trained on")
        return f"it holds pre-trained target parameters, not fine-tuned ones; fine-tune from it with {TARGET_ENV}"
    if kind == ADAPTER:
        restore = "rebuild the model it belongs to with `nnunet-tpp restore MODEL_FOLDER --backbone BACKBONE`"
        if expected == STUNET:
            return (f"it holds only the fine-tuned {details.get('method', 'PEFT')} weights of a trained model; pass "
                    f"{noun} here, and {restore}")
        return (f"it holds the fine-tuned weights of a trained model, not pre-trained target parameters; {TARGET_ENV} "
                f"takes {_EXPECTED[TARGET_PARAMETERS][1]}; to use the trained model, {restore}")
    if kind == STUNET and expected != NNUNET_CHECKPOINT:
        if expected == TARGET_PARAMETERS:
            return (f"pass it with -pretrained_weights (it is the backbone); {TARGET_ENV} takes "
                    f"{_EXPECTED[TARGET_PARAMETERS][1]}")
        return f"pass it with -pretrained_weights; an adapter file is {_EXPECTED[ADAPTER][1]}"
    if kind == NNUNET_CHECKPOINT and expected == STUNET:
        return (f"it is a network of nnU-Net's own (trainer {details.get('trainer_name')}), and this trainer adapts "
                f"STU-Net; use the _nnUNet trainer of the same family (e.g. ConvAdapterTrainer_nnUNet) with the "
                f"source model's plans (`nnunet-tpp adopt-plans`)")
    if kind == STUNET and expected == NNUNET_CHECKPOINT:
        return (f"the _nnUNet trainers adapt nnU-Net's own networks; for {found.description} use the STU-Net "
                f"trainer of the same family with the size suffix (e.g. ConvAdapterTrainer_B)")
    return f"pass {noun}"


def _sniff(path: str) -> tuple[str | None, str | None]:
    """``(container, None)`` for a PyTorch file (``"zip"``/``"legacy"``/None when unsure), or ``(None, what it
    is)`` for a file that is certainly not one."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return None, "an empty file"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None, "a damaged ZIP archive (a truncated or corrupt PyTorch checkpoint?)"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "zip", None
        return None, f"a ZIP archive that is not a PyTorch checkpoint (it holds {names[:3]})"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy", None
    if head[:1] == b"\x80":
        return None, "a plain Python pickle, not written by torch.save (it was not unpickled)"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(4)
        except (OSError, EOFError):
            inner = b""
        return None, ("a gzip-compressed NIfTI image (.nii.gz)" if _is_nifti(inner) else "a gzip-compressed file")
    if _is_nifti(head[:4]):
        return None, "a NIfTI image (.nii)"
    if head[:4] == b"\x89HDF":
        return None, "an HDF5 file"
    if len(head) > 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
        return None, "a safetensors file"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return None, "a DICOM file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        return None, "a text file"
    return None, None


def _is_nifti(first4: bytes) -> bool:
    return len(first4) == 4 and (int.from_bytes(first4, "little") in (348, 540)
                                 or int.from_bytes(first4, "big") in (348, 540))


def _all_tensors(d: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def _architecture(weights: dict) -> str:
    """``STU-Net-S`` (via :func:`describe_stunet`), or a short description of another network."""
    clean = {}
    for key, value in weights.items():
        key = str(key)
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    if STUNET_MARKER in clean:
        return describe_stunet(clean)
    keys = sorted(clean)
    sample = ", ".join(keys[:3])
    if any(re.search(r"(^|\.)blocks\.\d+\.attn\.(qkv|proj)\.", k) for k in keys) or "pos_embed" in clean:
        return f"not an STU-Net: a ViT (keys like {sample})"
    if any(k.startswith("encoder.stages.") for k in keys):
        return f"not an STU-Net: a dynamic_network_architectures U-Net of nnU-Net (keys like {sample})"
    return f"not an STU-Net (keys like {sample})"


def _network_class(checkpoint: dict) -> str | None:
    try:
        init = checkpoint["init_args"]
        arch = init["plans"]["configurations"][init["configuration"]]["architecture"]["network_class_name"]
        return str(arch).rsplit(".", 1)[-1]
    except (KeyError, TypeError):
        return None


def _identity_text(obj: dict) -> str:
    method, options, arch = obj.get("method"), obj.get("options"), obj.get("architecture")
    if not method:
        return ""
    return f": {method}" + (f" {options}" if options else "") + (f" on {arch}" if arch else "")


def _stunet_phrase(arch: str) -> str:
    """``an STU-Net-S checkpoint`` / ``a checkpoint of an STU-Net of unpublished size (...)``."""
    return f"an {arch} checkpoint" if arch.startswith("STU-Net-") else f"a checkpoint of {arch}"


def _clean(error: BaseException) -> str:
    """The first line of an error that says nothing about turning the weights-only reader off."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not re.search(r"weights_only|safe_globals|Weights only load failed", line)]
    return (lines[0][:200] if lines else "unreadable")
