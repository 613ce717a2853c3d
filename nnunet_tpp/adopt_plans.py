"""``nnunet-tpp adopt-plans``: give a dataset the plans of a trained (e.g. downloaded) nnU-Net model, so that the
model's network fits it, and preprocess the dataset with them.

nnU-Net's documented route (``nnUNetv2_move_plans_between_datasets``) needs the source dataset's preprocessed folder,
which the user of a downloaded model does not have. This command takes the plans from the model folder's
``plans.json`` (or a checkpoint's ``init_args``), writes them for dataset D under a new plans name, as nnU-Net's
command does (dataset name, plans name and data identifiers renamed, the reader/writer for D's files), puts D's
``dataset.json`` where ``nnUNetv2_preprocess`` expects it, and runs nnU-Net's own fingerprint extraction (which
``nnUNetv2_train`` needs in the preprocessed folder) and preprocessing. Everything is
checked before the first write: D's channels and file format must fit the model. An nnssl pre-training checkpoint
has no nnU-Net plans: :mod:`nnunet_tpp.adopt_nnssl` writes plans from its adaptation plan instead.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nnunet_tpp.nnunet_commands import run_nnunet


class AdoptPlansError(ValueError):
    """The source model or the target dataset cannot be used; nothing was written."""


@dataclass(frozen=True)
class SourceModel:
    """What adopt-plans reads from a trained model: its plans, its dataset.json and where they came from."""

    plans: dict
    dataset_json: dict
    origin: str


def read_source(source: str | os.PathLike) -> SourceModel:
    """Reads the plans and dataset.json of an nnU-Net model folder (``Trainer__Plans__configuration`` with
    ``plans.json`` and ``dataset.json``; a fold folder or the folder above also work) or of a checkpoint file
    (``init_args``; read with ``weights_only=True``)."""
    path = Path(source)
    if path.is_file():
        from nnunet_tpp.models.stunet_checkpoint import read_checkpoint
        from nnunet_tpp.models import file_kinds
        checkpoint = read_checkpoint(path, mmap=True, expected=file_kinds.NNUNET_CHECKPOINT)
        args = checkpoint.get("init_args")
        if "nnssl_adaptation_plan" in checkpoint:
            raise AdoptPlansError(f"{path} is an nnssl pre-training checkpoint: its plans come from its adaptation plan "
                                  f"(`nnunet-tpp adopt-plans` or nnunet_tpp.adopt_nnssl.adopt_nnssl_plans)")
        if not isinstance(args, dict) or "plans" not in args or "dataset_json" not in args:
            raise AdoptPlansError(f"{path} holds no nnU-Net plans (init_args): pass the model folder (with plans.json "
                                  f"and dataset.json) or a checkpoint_final.pth written by nnUNetv2_train")
        return SourceModel(args["plans"], args["dataset_json"], str(path))
    candidates = [path, path.parent] + sorted(p for p in path.glob("*__*__*") if p.is_dir())
    for folder in candidates:
        if (folder / "plans.json").is_file() and (folder / "dataset.json").is_file():
            return SourceModel(json.loads((folder / "plans.json").read_text()),
                               json.loads((folder / "dataset.json").read_text()), str(folder))
    raise AdoptPlansError(f"{path}: no plans.json + dataset.json here; pass an nnU-Net model folder "
                          f"(.../Trainer__Plans__3d_fullres) or one of its checkpoint_final.pth files")


def _channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def default_plans_name(source: SourceModel) -> str:
    """``<source plans name>_from_<source dataset>``: never nnU-Net's own ``nnUNetPlans`` of the target."""
    return f"{source.plans.get('plans_name', 'plans')}_from_{source.plans.get('dataset_name', 'model')}"


def adapted_plans(source: SourceModel, target_name: str, plans_name: str, reader_writer: str) -> dict:
    """The source plans for the target dataset (as nnU-Net's ``move_plans_between_datasets`` writes them)."""
    plans = json.loads(json.dumps(source.plans))
    old_name = plans.get("plans_name", "")
    plans.update(dataset_name=target_name, plans_name=plans_name, image_reader_writer=reader_writer)
    for config in plans["configurations"].values():
        identifier = config.get("data_identifier")
        if identifier:
            rest = identifier[len(old_name):] if old_name and identifier.startswith(old_name) else "_" + identifier
            config["data_identifier"] = plans_name + rest
    return plans


@dataclass(frozen=True)
class TargetDataset:
    """The dataset plans are adopted for: its nnU-Net name and id, raw folder, dataset.json and preprocessed folder."""

    name: str
    dataset_id: str
    raw: Path
    dataset_json: dict
    preprocessed: Path

    @property
    def channels(self) -> int:
        return _channels(self.dataset_json)

    @property
    def log(self) -> Path:
        return self.preprocessed / "adopt_plans.log"


def target_dataset(dataset: str) -> TargetDataset:
    """Resolves dataset D (id or name) under ``$nnUNet_raw`` and checks it has a dataset.json and training cases.

    Raises:
        AdoptPlansError: nnU-Net's folder variables unset, unknown dataset, no dataset.json, no training cases.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(root):
            raise AdoptPlansError(f"set {root} (as for any nnU-Net use)")
    try:
        name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    except RuntimeError as e:
        raise AdoptPlansError(f"dataset {dataset!r}: {e}") from None
    raw = Path(os.environ["nnUNet_raw"]) / name
    if not (raw / "dataset.json").is_file():
        raise AdoptPlansError(f"{raw / 'dataset.json'} not found: adopt-plans preprocesses the raw dataset D")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    if not get_filenames_of_train_images_and_targets(str(raw), dataset_json):
        raise AdoptPlansError(f"{raw} has no training cases")
    return TargetDataset(name, str(int(name[len("Dataset"):len("Dataset") + 3])), raw, dataset_json,
                         Path(os.environ["nnUNet_preprocessed"]) / name)


def free_plans_file(target: TargetDataset, plans_name: str) -> Path:
    """The path of a new plans file; :class:`AdoptPlansError` for a name nnU-Net cannot use or one that is taken."""
    if "__" in plans_name or "/" in plans_name:
        raise AdoptPlansError(f"plans name {plans_name!r} must not contain '__' or '/' (nnU-Net splits model folder "
                              f"names on '__')")
    plans_file = target.preprocessed / f"{plans_name}.json"
    if plans_file.exists():
        raise AdoptPlansError(f"{plans_file} exists; pass another name with -p, or remove it")
    return plans_file


def run_fingerprint(target: TargetDataset, num_processes: int, echo=print) -> None:
    """nnU-Net's fingerprint extraction of D, unless done (``nnUNetv2_train`` copies it into the results)."""
    if not (target.preprocessed / "dataset_fingerprint.json").exists():
        run_nnunet(["nnUNetv2_extract_fingerprint", "-d", target.dataset_id, "-np", str(num_processes)],
                   dict(os.environ), target.log, echo)


def write_plans(plans: dict, target: TargetDataset, plans_file: Path, echo=print) -> None:
    """Writes ``plans`` atomically and D's dataset.json beside them (``nnUNetv2_preprocess`` 2.8.1 needs it)."""
    target.preprocessed.mkdir(parents=True, exist_ok=True)
    tmp = plans_file.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(plans, indent=2))
    os.replace(tmp, plans_file)
    if not (target.preprocessed / "dataset.json").exists():
        shutil.copyfile(target.raw / "dataset.json", target.preprocessed / "dataset.json")


def preprocess(target: TargetDataset, plans_file: Path, configurations, num_processes: int, echo=print) -> None:
    """nnU-Net's fingerprint extraction (if missing) and ``nnUNetv2_preprocess`` of ``configurations`` with the
    plans of ``plans_file``; the plans file is removed again when this fails, so the adoption can be retried."""
    try:
        run_fingerprint(target, num_processes, echo)
        for config in configurations:
            run_nnunet(["nnUNetv2_preprocess", "-d", target.dataset_id, "-plans_name", plans_file.stem, "-c", config,
                        "-np", str(num_processes)], dict(os.environ), target.log, echo)
    except Exception:
        plans_file.unlink(missing_ok=True)
        raise


def adopt_plans(source: str | os.PathLike, dataset: str, plans_name: str | None = None,
                configurations: tuple[str, ...] = ("3d_fullres",), num_processes: int = 4,
                run_preprocessing: bool = True, echo=print) -> Path:
    """Writes the source model's plans for ``dataset``, its dataset.json beside them, and preprocesses it.

    Args:
        source: model folder or checkpoint (an nnssl checkpoint goes to
            :func:`nnunet_tpp.adopt_nnssl.adopt_nnssl_plans`; :func:`nnunet_tpp.adopt_nnssl.adopt` takes either).
        dataset: target dataset id or name (its raw folder must exist under ``$nnUNet_raw``).
        plans_name: the new plans identifier (default :func:`default_plans_name`); pass it to nnU-Net with ``-p``.
        configurations: configurations to preprocess (they must be in the source plans).
        num_processes: ``nnUNetv2_preprocess -np``.
        run_preprocessing: False writes the plans only.
    Returns:
        The written plans file. Raises :class:`AdoptPlansError` before writing anything when the dataset's
        channels or file format do not fit the model, the plans name is taken, or a configuration is missing.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    model = read_source(source)
    target = target_dataset(dataset)
    name, target_json = target.name, target.dataset_json
    ours, theirs = target.channels, _channels(model.dataset_json)
    if ours != theirs:
        raise AdoptPlansError(f"{name} has {ours} input channel(s) ({target_json.get('channel_names')}), the model "
                              f"{theirs} ({model.dataset_json.get('channel_names')}): its network cannot take these "
                              f"images (the _nnUNet trainers adapt the first layer only from a 1-channel model)")
    cases = get_filenames_of_train_images_and_targets(str(target.raw), target_json)
    example = next(iter(cases.values()))["images"][0]
    reader = determine_reader_writer_from_dataset_json(target_json, example, allow_nonmatching_filename=True,
                                                       verbose=False).__name__
    if model.plans.get("image_reader_writer") and reader != model.plans["image_reader_writer"]:
        raise AdoptPlansError(
            f"{name}'s images ({target_json['file_ending']}) are read by {reader}, but the model was trained on images "
            f"read by {model.plans['image_reader_writer']} ({model.dataset_json.get('file_ending')}); readers differ in "
            f"axis conventions, so convert the dataset to {model.dataset_json.get('file_ending')} first")
    missing = [c for c in configurations if c not in model.plans.get("configurations", {})]
    if missing:
        raise AdoptPlansError(f"the model's plans have no configuration(s) {missing}; they have "
                              f"{sorted(model.plans.get('configurations', {}))}")
    plans_file = free_plans_file(target, plans_name or default_plans_name(model))
    write_plans(adapted_plans(model, name, plans_file.stem, reader), target, plans_file, echo)
    echo(f"wrote {plans_file} (the plans of {model.origin}, for {name})")
    if run_preprocessing:
        preprocess(target, plans_file, configurations, num_processes, echo)
    return plans_file
