"""Writing and checking nnU-Net raw datasets (``imagesTr``/``labelsTr``/``dataset.json``).

Sources are only read, never modified. Every case is checked before anything is written: readable NIfTI,
3-D single-channel image, label on the image's grid, label values declared in the label set.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

FILE_ENDING = ".nii.gz"


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
    if min(image.GetSize()) < 16:
        raise DatasetError(f"{case.image}: size {image.GetSize()} is too small; nnU-Net needs >= 16 voxels "
                           f"per axis")
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


def write_raw_dataset(raw_root: Path, dataset_id: int, name: str, train: list[Case], labels: dict[str, int],
                      channel_name: str = "CT", test: list[Case] | None = None, overwrite: bool = False,
                      skip_invalid: bool = False) -> Path:
    """Checks all cases, then writes an nnU-Net raw dataset.

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id, name: nnU-Net dataset id and name.
        train: training cases (with labels).
        labels: ``{"background": 0, "liver": 1, ...}``.
        channel_name: name of the single input channel (``CT`` selects nnU-Net's CT normalisation).
        test: optional cases written to ``imagesTs``.
        overwrite: replace an existing dataset folder of the same name (ours only: we refuse to touch a
            folder that is not a dataset written by this function).
        skip_invalid: leave out the cases that fail the checks (they are listed in the folder's
            ``skipped_cases.json``) instead of stopping with an error that names all of them.
    Returns:
        The dataset folder.
    """
    if labels.get("background") != 0:
        raise DatasetError(f"labels must map 'background' to 0, got {labels}")
    problems = check_cases(train, labels)
    problems.update(check_cases(test or [], labels, need_labels=False))
    if problems and not skip_invalid:
        listing = "\n".join(f"  {case}: {why}" for case, why in problems.items())
        raise DatasetError(f"{len(problems)} case(s) cannot be used; nothing was written:\n{listing}")
    train = [c for c in train if c.name not in problems]
    test = [c for c in test or [] if c.name not in problems]
    if not train:
        raise DatasetError("no usable training cases")
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    marker = folder / ".written_by_nnunet_tpp"
    if folder.exists():
        if not overwrite:
            raise DatasetError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        if not marker.exists():
            raise DatasetError(f"{folder} exists and was not written by nnunet_tpp; refusing to overwrite it")
        import shutil
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    marker.touch()
    for case in train:
        _copy_as_nifti(case.image, folder / "imagesTr" / f"{case.name}_0000{FILE_ENDING}")
        _copy_as_nifti(case.label, folder / "labelsTr" / f"{case.name}{FILE_ENDING}", label=True)
    for case in test or []:
        _copy_as_nifti(case.image, folder / "imagesTs" / f"{case.name}_0000{FILE_ENDING}")
    dataset_json = {"channel_names": {"0": channel_name}, "labels": labels, "numTraining": len(train),
                    "file_ending": FILE_ENDING, "name": name}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    if problems:
        (folder / "skipped_cases.json").write_text(json.dumps(problems, indent=2))
    return folder


def _copy_as_nifti(src: Path, dst: Path, label: bool = False) -> None:
    image = read_image(src)
    if label:
        image = sitk.Cast(image, sitk.sitkUInt8)
    sitk.WriteImage(image, str(dst), useCompression=True)


def cases_from_folder(folder: Path) -> list[Case]:
    """Finds ``NAME.nii[.gz]`` images with ``NAME_labels.nii[.gz]`` (or ``labels/NAME.nii.gz``) beside them.

    Returns:
        The paired cases, sorted by name. Images without a label raise :class:`DatasetError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    images = sorted(p for p in folder.iterdir() if re.search(r"\.nii(\.gz)?$", p.name)
                    and not re.search(r"_labels?\.nii(\.gz)?$", p.name))
    cases = []
    for image in images:
        stem = re.sub(r"\.nii(\.gz)?$", "", image.name)
        candidates = [folder / f"{stem}_labels.nii.gz", folder / f"{stem}_labels.nii", folder / f"{stem}_label.nii.gz",
                      folder / "labels" / f"{stem}.nii.gz", folder / "labels" / f"{stem}.nii"]
        label = next((c for c in candidates if c.exists()), None)
        if label is None:
            raise DatasetError(f"{image} has no label file (looked for {stem}_labels.nii.gz or labels/{stem}.nii.gz)")
        cases.append(Case(re.sub(r"[^A-Za-z0-9]", "", stem) or "case", image, label))
    if not cases:
        raise DatasetError(f"no NIfTI images found in {folder}")
    return cases
