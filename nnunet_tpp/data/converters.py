"""Converters from the LiTS and KiTS release layouts to nnU-Net raw datasets with the standard labels.

LiTS: the challenge layout (``volume-N.nii`` + ``segmentation-N.nii``, in any sub-folders) or the Medical
Segmentation Decathlon ``Task03_Liver`` (``imagesTr/liver_N.nii.gz`` + ``labelsTr/liver_N.nii.gz``);
labels 1 liver, 2 tumor. KiTS: ``case_XXXXX/imaging.nii.gz`` with ``segmentation.nii.gz`` (KiTS19, KiTS23)
or ``aggregated_MAJ_seg.nii.gz`` (KiTS21); labels 1 kidney, 2 tumor, and 3 cyst where the release has it.
Sources are only read. Every case is checked first; problems are reported by case name.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_tpp.data.nnunet_raw import Case, DatasetError, check_destination, write_raw_dataset

LITS_LABELS = {"background": 0, "liver": 1, "tumor": 2}
KITS_LABELS = {"background": 0, "kidney": 1, "tumor": 2}
KITS_CYST = 3


def lits_cases(source: Path) -> list[Case]:
    """Finds the LiTS cases of either layout under ``source``."""
    source = Path(source)
    msd_images = source / "imagesTr"
    if msd_images.is_dir():
        cases = []
        for image in sorted(msd_images.glob("liver_*.nii*")):
            if image.name.startswith("._"):
                continue
            label = source / "labelsTr" / image.name
            cases.append(Case(f"liver{_number(image.name):03d}", image, label if label.exists() else None))
        return cases
    volumes = sorted((p for p in source.rglob("volume-*.nii*") if not p.name.startswith("._")),
                     key=lambda p: _number(p.name))
    cases = []
    for volume in volumes:
        n = _number(volume.name)
        segs = [p for p in source.rglob(f"segmentation-{n}.nii*") if not p.name.startswith("._")]
        cases.append(Case(f"lits{n:03d}", volume, segs[0] if segs else None))
    return cases


def kits_cases(source: Path) -> list[Case]:
    """Finds ``case_XXXXX`` folders (KiTS19/21/23) under ``source``."""
    cases = []
    for folder in sorted(p for p in Path(source).rglob("case_*") if p.is_dir()):
        image = folder / "imaging.nii.gz"
        if not image.exists():
            continue
        label = next((folder / n for n in ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")
                      if (folder / n).exists()), None)
        cases.append(Case(f"kits{_number(folder.name):05d}", image, label))
    return cases


def _number(name: str) -> int:
    match = re.search(r"(\d+)", name)
    if match is None:
        raise DatasetError(f"cannot read a case number from {name!r}")
    return int(match.group(1))


def _has_cyst(cases: list[Case]) -> bool:
    for case in cases:
        if case.label is None:
            continue
        try:
            if (sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) == KITS_CYST).any():
                return True
        except RuntimeError:
            continue  # unreadable: reported by the checks
    return False


def convert(kind: str, source: Path, raw_root: Path, dataset_id: int, name: str | None = None,
            overwrite: bool = False, skip_invalid: bool = False,
            other_roots: Iterable[Path | str | None] = ()) -> Path:
    """Converts a LiTS or KiTS release folder to an nnU-Net raw dataset.

    The destination is checked first (a dataset id that is taken by another name, in ``raw_root`` or in
    ``other_roots``, is refused naming that folder; see :func:`nnunet_tpp.data.nnunet_raw.check_destination`),
    then every case; nothing is written unless all checks pass.

    Args:
        kind: ``lits`` or ``kits``.
        source: the release folder (never modified).
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net dataset id; ``name`` defaults to ``LiTS`` / ``KiTS``.
        overwrite, skip_invalid: see :func:`nnunet_tpp.data.nnunet_raw.write_raw_dataset`; ``overwrite``
            replaces only a dataset of the same id and name that this command wrote.
        other_roots: ``nnUNet_preprocessed`` and ``nnUNet_results`` (their datasets take ids too).
    Returns:
        The written dataset folder.
    """
    source = Path(source)
    if kind not in ("lits", "kits"):
        raise DatasetError(f"unknown dataset kind {kind!r}; choose lits or kits")
    if not source.is_dir():
        raise DatasetError(f"{source} is not a folder; pass the {kind} release folder")
    name = name or ("LiTS" if kind == "lits" else "KiTS")
    check_destination(raw_root, dataset_id, name, overwrite, other_roots)
    if kind == "lits":
        cases, labels, default_name = lits_cases(source), dict(LITS_LABELS), "LiTS"
    elif kind == "kits":
        cases, labels, default_name = kits_cases(source), dict(KITS_LABELS), "KiTS"
        if _has_cyst(cases):
            labels["cyst"] = KITS_CYST
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose lits or kits")
    if not cases:
        layouts = ("volume-N.nii + segmentation-N.nii, or Task03_Liver imagesTr/labelsTr" if kind == "lits"
                   else "case_XXXXX/imaging.nii.gz + segmentation.nii.gz (or aggregated_MAJ_seg.nii.gz)")
        raise DatasetError(f"no {kind} cases found in {source}; expected {layouts}")
    unlabeled = [c for c in cases if c.label is None]
    if unlabeled and not skip_invalid:
        raise DatasetError(f"{len(unlabeled)} case(s) have no segmentation: "
                           + ", ".join(f"{c.name} ({c.image})" for c in unlabeled[:10]))
    return write_raw_dataset(raw_root, dataset_id, name or default_name, [c for c in cases if c.label is not None],
                             labels, overwrite=overwrite, skip_invalid=skip_invalid, other_roots=other_roots)


def label_values(path: Path) -> list[int]:
    """The label values present in a label file (for reports and tests)."""
    return sorted(int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
