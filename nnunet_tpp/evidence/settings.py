"""Settings of the 3-D evidence protocol (``configs/evidence/3d.yaml`` holds the defaults, ``3d_full.yaml`` the
longer schedule of ``--full``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_tpp.settings_file import settings_from_yaml

#: arm -> (trainer family, TPP pretext or None, starts from the upstream checkpoint)
ARMS_3D: dict[str, tuple[str, str | None, bool]] = {
    "scratch": ("STUNetTrainer", None, False),
    "head_only": ("LinearProbeTrainer", None, True),
    "full": ("FullFinetuneTrainer", None, True),
    "conv_adapter": ("ConvAdapterTrainer", None, True),
    "conv_adapter_tpp_dino": ("TPPConvAdapterTrainer", "dino", True),
    "conv_adapter_tpp_mae": ("TPPConvAdapterTrainer", "mae", True),
}
#: the paired comparisons read from the result: (arm, against), when both ran
COMPARISONS = [("conv_adapter_tpp_mae", "conv_adapter"), ("conv_adapter_tpp_dino", "conv_adapter"),
               ("conv_adapter", "full"), ("conv_adapter", "head_only"), ("full", "scratch"),
               ("conv_adapter_tpp_mae", "full"), ("conv_adapter_tpp_dino", "full")]
#: the arm whose starting point is predicted as "the untrained network" (the first of these that runs)
UNTRAINED_FROM = ("conv_adapter", "head_only", "full", "conv_adapter_tpp_mae", "conv_adapter_tpp_dino", "scratch")
#: ``--full``: a longer schedule for a GPU, on nnU-Net's own plan (``configs/evidence/3d_full.yaml`` holds it too)
FULL_SCHEDULE = {"epochs": 100, "iterations_per_epoch": 250, "upstream_epochs": 250, "pretext_epochs": 50,
                 "pretext_iterations_per_epoch": 100, "voxels": None, "batch_size": None, "device": "cuda"}


class EvidenceSettingsError(ValueError):
    """A setting of the evidence protocol that cannot work; the message says which and how to fix it."""


def check_counts(settings, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Raises :class:`EvidenceSettingsError` unless each ``required`` field is an integer >= 1 and each ``optional``
    one is that or None."""
    for name in required + optional:
        value = getattr(settings, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EvidenceSettingsError(f"{name} must be an integer >= 1{' (or null)' if name in optional else ''}, "
                                        f"got {value!r}")


def check_arms(arms: list[str], known, protocol: str) -> None:
    """Raises :class:`EvidenceSettingsError` for no arm or an arm not in ``known``."""
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise EvidenceSettingsError(f"--arms {','.join(map(str, arms))}: unknown arm(s) {unknown} for the {protocol} "
                                    f"protocol; choose from {', '.join(known)}")


def check_device(device: str, allowed: tuple[str, ...]) -> None:
    """Raises :class:`EvidenceSettingsError` for a device not in ``allowed``, or ``cuda`` where PyTorch sees none."""
    if device not in allowed:
        raise EvidenceSettingsError(f"--device must be {' or '.join(allowed)}, got {device!r}")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise EvidenceSettingsError("--device cuda: this PyTorch sees no CUDA device; use --device cpu")


@dataclass
class Evidence3D:
    """The 3-D protocol (CHAOS -> LA in the README): upstream supervised pre-training of STU-Net on ``upstream``,
    then every arm on ``labelled`` cases of ``downstream`` per seed, scored on fixed held-out test subjects.

    Attributes:
        upstream, downstream: folders of ``NAME.nii.gz`` + ``NAME_labels.nii.gz`` with ``labels.json``.
        out: everything is written below it; a rerun reuses what is finished.
        group: regex whose first group names a case's subject (None: one subject per case).
        test: test subjects (None: a fifth of the downstream subjects, at least 1).
        seeds: seeds 0..seeds-1; each draws its own labelled cases and initialisation.
        labelled: labelled training cases per seed.
        arms: which of :data:`ARMS_3D` to run.
        size: STU-Net size.
        epochs, iterations_per_epoch: the supervised schedule of every arm.
        upstream_epochs: the upstream pre-training's epochs (same iterations per epoch).
        pretext_epochs, pretext_iterations_per_epoch: the TPP stage (the recipe's other pretext settings stay
            the official defaults).
        voxels: the median case's voxel budget that sets the target spacing (None: nnU-Net's spacing).
        batch_size: the plans' batch size (None: nnU-Net's).
        device: cpu or cuda.
        upstream_id, downstream_id: nnU-Net dataset ids inside ``out``.
    """

    upstream: Path | None = None
    downstream: Path | None = None
    out: Path = Path("evidence")
    group: str | None = None
    test: int | None = None
    seeds: int = 3
    labelled: int = 4
    arms: list[str] = field(default_factory=lambda: list(ARMS_3D))
    size: str = "S"
    epochs: int = 10
    iterations_per_epoch: int = 25
    upstream_epochs: int = 16
    pretext_epochs: int = 4
    pretext_iterations_per_epoch: int = 25
    voxels: int | None = 40000
    batch_size: int | None = 2
    device: str = "cpu"
    upstream_id: int = 701
    downstream_id: int = 702

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "Evidence3D":
        """The settings of a YAML file (``evidence:`` mapping, or the top level) with ``overrides`` on top."""
        return settings_from_yaml(cls, path, "evidence", overrides, ("upstream", "downstream", "out"),
                                  EvidenceSettingsError)

    def check(self) -> None:
        """Every setting checked (raises :class:`EvidenceSettingsError`); the data are checked by the protocol."""
        check_counts(self, ("seeds", "labelled", "epochs", "iterations_per_epoch", "upstream_epochs", "pretext_epochs",
                            "pretext_iterations_per_epoch"), ("voxels", "batch_size", "test"))
        check_arms(self.arms, ARMS_3D, "3-D")
        if self.size not in ("S", "B", "L", "H"):
            raise EvidenceSettingsError(f"size must be S, B, L or H, got {self.size!r}")
        check_device(self.device, ("cpu", "cuda"))
        for name in ("upstream", "downstream"):
            folder = getattr(self, name)
            if folder is None or not Path(folder).is_dir():
                raise EvidenceSettingsError(f"--{name} {folder}: not a folder; give a folder of NAME.nii.gz + "
                                            f"NAME_labels.nii.gz with a labels.json")
        ids = (self.upstream_id, self.downstream_id)
        if len(set(ids)) != 2 or not all(isinstance(i, int) and 1 <= i <= 999 for i in ids):
            raise EvidenceSettingsError(f"upstream_id and downstream_id must be two different ids in 1..999, "
                                        f"got {ids}")

    def to_json(self) -> dict:
        """The settings as plain JSON types (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

