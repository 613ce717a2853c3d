"""Settings of the 2-D evidence protocol (``configs/evidence/2d.yaml`` holds the defaults, ``2d_full.yaml`` the
longer schedule of ``--full``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_tpp.evidence.settings import EvidenceSettingsError, check_arms, check_counts, check_device
from nnunet_tpp.settings_file import settings_from_yaml

#: arm -> (the PEFT method on LiteMedSAM's encoder, the TPP pretext or "none")
ARMS_2D: dict[str, tuple[str, str]] = {
    "head_only": ("linear_probe", "none"),
    "lora": ("lora", "none"),
    "adapter": ("adapter", "none"),
    "adapter_tpp": ("adapter", "simmim"),
    "full": ("full", "none"),
}
#: the paired comparisons read from the result: (arm, against), when both ran
COMPARISONS_2D = [("adapter_tpp", "adapter"), ("adapter", "full"), ("lora", "full"), ("adapter", "head_only"),
                  ("lora", "head_only"), ("adapter_tpp", "full")]
#: the arm whose starting point is scored as "the untrained network" (the first of these that runs)
UNTRAINED_FROM_2D = ("adapter", "lora", "head_only", "full", "adapter_tpp")
#: ``--full``: a longer schedule for a GPU (``configs/evidence/2d_full.yaml`` holds it too)
FULL_SCHEDULE_2D = {"labelled": 35, "validation": 20, "epochs": 20, "pretext_images": None, "pretext_epochs": 20,
                    "pretext_batch_size": 32, "device": "cuda"}
#: settings two invocations must share for one to reuse the other's results (seeds and arms may grow)
SHARED_SETTINGS_2D = ("downstream", "group", "test", "labelled", "validation", "epochs", "batch_size", "pretext_images",
                      "pretext_epochs", "pretext_batch_size")


@dataclass
class Evidence2D:
    """The 2-D protocol (LiteMedSAM on PH2 in the README): LiteMedSAM's pre-trained medical image encoder with each
    arm's method, ``labelled`` training images per seed, scored on fixed held-out test subjects.

    Attributes:
        downstream: a folder of ``images/`` + ``masks/`` (any layout ``train2d --task seg`` reads as one pool).
        out: everything is written below it; a rerun reuses what is finished.
        group: regex whose first group names an image's subject (searched in the file stem; None: one subject per
            image).
        test: test subjects (None: a fifth of the subjects, at least 1).
        seeds: seeds 0..seeds-1; each draws its own labelled and validation images and initialisation.
        labelled: labelled training images per seed.
        validation: validation images per seed (the best epoch is chosen on them), drawn from the pool after the
            labelled ones.
        arms: which of :data:`ARMS_2D` to run.
        epochs, batch_size: the supervised schedule of every arm (learning rates: ``train2d``'s defaults per
            method).
        pretext_images: pool images the TPP stage sees per seed (a seeded draw; None: the whole pool); never a test
            image.
        pretext_epochs, pretext_batch_size: the TPP stage (its other settings: SimMIM's, see
            :mod:`nnunet_tpp.vision2d.tpp`).
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    downstream: Path | None = None
    out: Path = Path("evidence2d")
    group: str | None = None
    test: int | None = None
    seeds: int = 3
    labelled: int = 12
    validation: int = 8
    arms: list[str] = field(default_factory=lambda: list(ARMS_2D))
    epochs: int = 4
    batch_size: int = 4
    pretext_images: int | None = 64
    pretext_epochs: int = 1
    pretext_batch_size: int = 8
    device: str = "cpu"

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "Evidence2D":
        """The settings of a YAML file (``evidence:`` mapping, or the top level) with ``overrides`` on top."""
        return settings_from_yaml(cls, path, "evidence", overrides, ("downstream", "out"), EvidenceSettingsError)

    def check(self) -> None:
        """Every setting checked (raises :class:`EvidenceSettingsError`); the data are checked by the protocol."""
        check_counts(self, ("seeds", "labelled", "validation", "epochs", "batch_size", "pretext_epochs",
                            "pretext_batch_size"), ("pretext_images", "test"))
        check_arms(self.arms, ARMS_2D, "2-D")
        check_device(self.device, ("cpu", "cuda", "auto"))
        folder = self.downstream
        if folder is None or not (Path(folder) / "images").is_dir() or not (Path(folder) / "masks").is_dir():
            raise EvidenceSettingsError(f"--downstream {folder}: the 2-D protocol needs a folder with images/ and "
                                        f"masks/ (one mask per image, the same file stem)")

    def to_json(self) -> dict:
        """The settings as plain JSON types (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
