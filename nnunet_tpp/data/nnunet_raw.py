"""Writing and checking nnU-Net raw datasets (``imagesTr``/``labelsTr``/``dataset.json``).

Sources are only read, never modified. Every case is checked before anything is written: readable NIfTI,
3-D single-channel image, label on the image's grid, label values declared in the label set.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

FILE_ENDING = ".nii.gz"
MARKER = ".written_by_nnunet_tpp"  # in every dataset folder this module wrote: only those may be overwritten


class DatasetError(ValueError):
    """A case or dataset that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Case:
    """One training (or test) case: an image file and, for training, its label file."""

    name: str
    image: Path
    label: Path | None = None


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name, e.g. ``Dataset501_Phantom``."""
    if not 1 <= int(dataset_id) <= 999:
        raise DatasetError(f"dataset id must be within 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9]+", name):
        raise DatasetError(f"dataset name must be letters and digits only, got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def read_image(path: Path) -> sitk.Image:
    """Reads an image with SimpleITK, turning any reader failure into a :class:`DatasetError`."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DatasetError(f"cannot read {path}: not a valid image file ({str(e).strip().splitlines()[-1]})"
                           ) from None


def check_case(case: Case, labels: dict[str, int]) -> None:
    """Checks one case against the rules above; raises :class:`DatasetError` naming the file."""
    image = read_image(case.image)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(
            f"{case.image}: expected a 3-D single-channel image, found {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s). Split multi-channel data into one file "
            f"per channel (_0000, _0001, ...) and declare them in channel_names.")
    if case.label is None:
        return
    label = read_image(case.label)
    if label.GetSize() != image.GetSize() or not np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-3) \
            or not np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-2) \
            or not np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-3):
        raise DatasetError(f"{case.label}: label grid (size {label.GetSize()}, spacing {label.GetSpacing()}) "
                           f"does not match its image {case.image} (size {image.GetSize()}, spacing "
                           f"{image.GetSpacing()})")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
    unknown = sorted(values - set(labels.values()))
    if unknown:
        raise DatasetError(f"{case.label}: label values {unknown} are not in the dataset's label set "
                           f"{labels}; add them to the labels or fix the segmentation")


def check_cases(cases: list[Case], labels: dict[str, int], need_labels: bool = True) -> dict[str, str]:
    """Checks every case (see :func:`check_case`) and collects the problems instead of stopping at the first.

    Returns:
        ``{case name: what is wrong}`` for the cases that cannot be used (empty when all are fine).
    """
    problems = {}
    for case in cases:
        try:
            if need_labels and case.label is None:
                raise DatasetError(f"training case {case.name} has no label file")
            check_case(case if need_labels else Case(case.name, case.image), labels)
        except DatasetError as e:
            problems[case.name] = str(e)
    return problems


def check_destination(raw_root: Path, dataset_id: int, name: str, overwrite: bool = False,
                      other_roots: Iterable[Path | str | None] = ()) -> Path:
    """Checks that a dataset ``dataset_id``/``name`` may be written under ``raw_root``, before anything is.

    The id must be free: no folder of that id with another name in ``raw_root`` or in ``other_roots`` (pass
    ``nnUNet_preprocessed`` and ``nnUNet_results``: nnU-Net looks in all three, and with two names for one id
    every nnU-Net command for it fails). A folder of the same id and name is replaced only with
    ``overwrite`` and only when this module wrote it.

    Returns:
        The dataset folder to write. Raises :class:`DatasetError` naming the existing folder and the fix.
    """
    folder_name = dataset_folder_name(dataset_id, name)
    raw_root = Path(raw_root)
    if raw_root.exists() and not raw_root.is_dir():
        raise DatasetError(f"{raw_root} is a file, not a folder; point nnUNet_raw (--raw) at a folder")
    prefix = f"Dataset{int(dataset_id):03d}"  # nnU-Net's own test: a sub-folder name starting with it
    taken = []
    for root in (raw_root, *other_roots):
        if root and Path(root).is_dir():
            taken += [p for p in sorted(Path(root).iterdir())
                      if p.is_dir() and p.name.startswith(prefix) and p.name != folder_name]
    if taken:
        raise DatasetError(
            f"dataset id {int(dataset_id)} is taken: {', '.join(str(p) for p in taken)} exists. nnU-Net needs one "
            f"name per id (with two, every nnU-Net command for {int(dataset_id)} fails: 'More than one dataset "
            f"name found'). Pick a free id with -d, or remove or rename that folder; --overwrite only replaces "
            f"{folder_name} itself. Nothing was written.")
    folder = raw_root / folder_name
    if folder.exists():
        if not overwrite:
            raise DatasetError(f"{folder} exists; pass --overwrite (overwrite=True) to replace it. Nothing was "
                               f"written.")
        if not (folder / MARKER).exists():
            raise DatasetError(f"{folder} exists and was not written by nnunet_tpp; refusing to overwrite it. "
                               f"Remove it yourself, or pick another id or name. Nothing was written.")
    return folder


def write_raw_dataset(raw_root: Path, dataset_id: int, name: str, train: list[Case], labels: dict[str, int],
                      channel_name: str = "CT", test: list[Case] | None = None, overwrite: bool = False,
                      skip_invalid: bool = False, other_roots: Iterable[Path | str | None] = ()) -> Path:
    """Checks the destination and all cases, then writes an nnU-Net raw dataset.

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id, name: nnU-Net dataset id and name.
        train: training cases (with labels).
        labels: ``{"background": 0, "liver": 1, ...}``.
        channel_name: name of the single input channel (``CT`` selects nnU-Net's CT normalisation).
        test: optional cases written to ``imagesTs``.
        overwrite: replace an existing dataset folder of the same id and name (ours only: we refuse to touch a
            folder that is not a dataset written by this function).
        skip_invalid: leave out the cases that fail the checks (they are listed in the folder's
            ``skipped_cases.json``) instead of stopping with an error that names all of them.
        other_roots: further nnU-Net folders whose datasets take ids (see :func:`check_destination`).
    Returns:
        The dataset folder. It is written into a temporary sibling and renamed into place, so a refused or
        failed call leaves ``raw_root`` as it was.
    """
    if labels.get("background") != 0:
        raise DatasetError(f"labels must map 'background' to 0, got {labels}")
    folder = check_destination(raw_root, dataset_id, name, overwrite, other_roots)
    problems = check_cases(train, labels)
    problems.update(check_cases(test or [], labels, need_labels=False))
    if problems and not skip_invalid:
        listing = "\n".join(f"  {case}: {why}" for case, why in problems.items())
        raise DatasetError(f"{len(problems)} case(s) cannot be used; nothing was written:\n{listing}")
    train = [c for c in train if c.name not in problems]
    test = [c for c in test or [] if c.name not in problems]
    if not train:
        raise DatasetError("no usable training cases; nothing was written")
    created_root = not Path(raw_root).exists()
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        _write_dataset(tmp, name, train, test, labels, channel_name, problems)
        if folder.exists():  # checked above: ours, and overwrite was asked for
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root and Path(raw_root).is_dir() and not any(Path(raw_root).iterdir()):
            Path(raw_root).rmdir()
        raise
    return folder


def _write_dataset(folder: Path, name: str, train: list[Case], test: list[Case], labels: dict[str, int],
                   channel_name: str, problems: dict[str, str]) -> None:
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    for case in train:
        _copy_as_nifti(case.image, folder / "imagesTr" / f"{case.name}_0000{FILE_ENDING}")
        _copy_as_nifti(case.label, folder / "labelsTr" / f"{case.name}{FILE_ENDING}", label=True)
    for case in test:
        _copy_as_nifti(case.image, folder / "imagesTs" / f"{case.name}_0000{FILE_ENDING}")
    dataset_json = {"channel_names": {"0": channel_name}, "labels": labels, "numTraining": len(train),
                    "file_ending": FILE_ENDING, "name": name}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    if problems:
        (folder / "skipped_cases.json").write_text(json.dumps(problems, indent=2))


def _copy_as_nifti(src: Path, dst: Path, label: bool = False) -> None:
    image = read_image(src)
    if label:
        image = sitk.Cast(image, sitk.sitkUInt8)
    sitk.WriteImage(image, str(dst), useCompression=True)


def cases_from_folder(folder: Path) -> list[Case]:
    """Finds ``NAME.nii[.gz]`` images with ``NAME_labels.nii[.gz]`` (or ``labels/NAME.nii.gz``) beside them.

    Returns:
        The paired cases, sorted by name. Raises :class:`DatasetError` when the folder holds no images (saying
        so), or naming every image without a label file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    images = sorted(p for p in folder.iterdir() if re.search(r"\.nii(\.gz)?$", p.name)
                    and not re.search(r"_labels?\.nii(\.gz)?$", p.name) and not p.name.startswith("."))
    if not images:
        raise DatasetError(f"found no image files in {folder}: expected NAME.nii.gz (or .nii) images, each with "
                           f"its label map NAME_labels.nii.gz beside it (or in labels/NAME.nii.gz)")
    cases, unlabeled = [], []
    for image in images:
        stem = re.sub(r"\.nii(\.gz)?$", "", image.name)
        candidates = [folder / f"{stem}_labels.nii.gz", folder / f"{stem}_labels.nii", folder / f"{stem}_label.nii.gz",
                      folder / "labels" / f"{stem}.nii.gz", folder / "labels" / f"{stem}.nii"]
        label = next((c for c in candidates if c.exists()), None)
        if label is None:
            unlabeled.append(image)
            continue
        cases.append(Case(re.sub(r"[^A-Za-z0-9]", "", stem) or "case", image, label))
    if unlabeled:
        raise DatasetError(f"{len(unlabeled)} image(s) have no label file: "
                           + "; ".join(f"{p} has no label file (looked for "
                                       f"{re.sub(r'[.]nii([.]gz)?$', '', p.name)}_labels.nii.gz or labels/"
                                       f"{re.sub(r'[.]nii([.]gz)?$', '', p.name)}.nii.gz)" for p in unlabeled[:10]))
    names = [c.name for c in cases]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise DatasetError(f"case names {clashes} occur twice in {folder} once reduced to letters and digits "
                           f"(nnU-Net's case names); rename the files")
    return cases


def labels_of_folder(folder: Path) -> dict[str, int]:
    """The label names of a case folder, from its ``labels.json`` (``{"background": 0, "liver": 1, ...}``).

    Returns:
        ``{name: value}``. Raises :class:`DatasetError` when the file is missing, not JSON, not a map of names to
        integers, or does not map ``background`` to 0.
    """
    path = Path(folder) / "labels.json"
    if not path.exists():
        raise DatasetError(f"{folder}: give the label names in a labels.json there "
                           f"(e.g. {{\"background\": 0, \"liver\": 1}})")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); write e.g. {{\"background\": 0, \"liver\": 1}}"
                           ) from None
    return checked_labels(raw, str(path))


def checked_labels(raw, where: str) -> dict[str, int]:
    """``raw`` as ``{name: int}`` with ``background`` 0; raises :class:`DatasetError` naming ``where``."""
    try:
        labels = {str(k): int(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: labels are a map of names to integers, e.g. {{\"background\": 0, "
                           f"\"liver\": 1}}; got {raw!r}") from None
    if labels.get("background") != 0:
        raise DatasetError(f"{where}: the labels must map 'background' to 0, got {labels}")
    return labels
