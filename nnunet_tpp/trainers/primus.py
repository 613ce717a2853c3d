"""What nnU-Net's Primus trainers do differently from its CNN trainers, as a mixin over the package's PEFT trainer.

``FullFinetuneTrainer_Primus_M``, ``LinearProbeTrainer_PrimusV3_S``, ``FullFinetuneTrainer_Primus`` ... are a
family (``recipes.yaml``: the PEFT method) on a Primus backbone (:mod:`nnunet_tpp.trainers.backbones`) with
:class:`PrimusTrainerMixin` (:mod:`nnunet_tpp.trainers.zoo` puts them together). The mixin gives them the
optimisation of nnU-Net's Primus trainers:

* AdamW (betas 0.9 / 0.98, weight decay 5e-2) on the trainable parameters; learning rate 1e-4 when a pre-trained
  checkpoint was loaded (nnU-Net master's ``PretrainedTrainer_Primusx``) and 3e-4 without one (nnunetv2 2.8.1's
  ``nnUNet_Primus_*_Trainer``); a user recipe's ``initial_lr`` / ``weight_decay`` (``NNUNET_TPP_RECIPE``) win;
* the learning rate rises linearly over the first 50 epochs (``NNUNET_TPP_WARMUP_EPOCHS``), then decays with
  nnU-Net's polynomial schedule over the remaining epochs, the optimiser (its moments) kept across the switch;
* one output, no deep supervision; gradient norm clipped at 1; autocast on CUDA only;
* activation checkpointing (recipe ``activation_checkpointing: on | auto``) of each EVA block
  (:func:`nnunet_tpp.models.primus.set_activation_checkpointing`); the CNN memory paths (lean norm/activation) have
  nothing to act on in a transformer.

Which methods have Primus trainers is :data:`PRIMUS_METHODS`: full fine-tuning, the decoder-only probe, LoRA (q and
v of every EVA block, :func:`nnunet_tpp.trainers.recipe.backbone_peft_defaults`) and Houlsby adapters
(``AdapterTrainer_Primus_*``; where each method attaches on Primus: :mod:`nnunet_tpp.models.primus_sites`). They all
take the optimisation above: nnU-Net's pretrained Primus trainer has no PEFT variant to copy other defaults from.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
from nnunetv2.utilities.helpers import dummy_context

from nnunet_tpp.models.lean import MemoryPaths
from nnunet_tpp.models.primus import set_activation_checkpointing
from nnunet_tpp.trainers.base import PLANS_KEY, build_network
from nnunet_tpp.trainers.recipe import ENV_RECIPE, PRIMUS_METHODS, read_recipe_file, resolve_recipe  # noqa: F401

PRETRAINED_LR = 1e-4
SCRATCH_LR = 3e-4
WEIGHT_DECAY = 5e-2
BETAS = (0.9, 0.98)
WARMUP_EPOCHS = 50
GRAD_CLIP = 1.0
ENV_WARMUP = "NNUNET_TPP_WARMUP_EPOCHS"
CHECKPOINTING = "eva_checkpointing"


def primus_network_spec(spec: dict) -> dict:
    """A recipe's network spec for a Primus: the CNN memory paths dropped (``memory: None``) and the recipe's
    ``activation_checkpointing`` kept as checkpointing of the EVA blocks (``eva_checkpointing``)."""
    if CHECKPOINTING in spec:
        return spec
    memory = spec.get("memory") or {}
    return {**spec, "memory": None, CHECKPOINTING: memory.get("activation_checkpointing", "off")}


def build_primus_network(spec: dict, configuration_manager, num_input_channels: int, num_output_channels: int
                         ) -> torch.nn.Module:
    """The Primus of a (Primus) network spec with its PEFT method; its EVA blocks checkpointed when the spec says
    ``on``.

    Returns:
        The network (random weights).
    """
    spec = primus_network_spec(spec)
    net = build_network(spec, configuration_manager, num_input_channels, num_output_channels, False)
    on = spec[CHECKPOINTING] == "on"
    set_activation_checkpointing(net, on)
    net.memory_paths = MemoryPaths(lean_norm_act=False, activation_checkpointing="on" if on else "off")
    return net


def warmup_epochs() -> int:
    """``NNUNET_TPP_WARMUP_EPOCHS`` or nnU-Net's 50; raises ``ValueError`` for a value that is not an integer >= 1."""
    raw = os.environ.get(ENV_WARMUP, "")
    if raw == "":
        return WARMUP_EPOCHS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{ENV_WARMUP}={raw!r}: give the warm-up length in epochs, an integer >= 1")
    return int(raw)


def _user_recipe_fields() -> set[str]:
    path = os.environ.get(ENV_RECIPE)
    return set(read_recipe_file(path)) if path else set()


class PrimusTrainerMixin:
    """nnU-Net's Primus optimisation for a :class:`~nnunet_tpp.trainers.base.PeftTrainer` on a Primus backbone
    (put it first in the bases)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        spec = primus_network_spec(self.configuration_manager.configuration[PLANS_KEY])
        self.plans_manager.plans["configurations"][configuration][PLANS_KEY] = spec
        self.configuration_manager.configuration[PLANS_KEY] = spec
        self.enable_deep_supervision = False
        user = _user_recipe_fields()
        self.lr_from_recipe = "initial_lr" in user
        if "weight_decay" not in user:
            self.weight_decay = WEIGHT_DECAY
        self.warmup_epochs = warmup_epochs()
        self.training_stage = None
        self._set_primus_lr(pretrained=False)
        lr = (f"lr {self.initial_lr} (recipe)" if self.lr_from_recipe else
              f"lr {SCRATCH_LR} from scratch, {PRETRAINED_LR} once a pre-trained checkpoint is loaded")
        self.print_to_log_file(f"Primus optimisation (nnU-Net's Primus trainers): AdamW {lr}, weight decay "
                               f"{self.weight_decay}, linear warm-up over {self.warmup_epochs} epochs, then poly "
                               f"decay; gradient norm clipped at {GRAD_CLIP}; no deep supervision",
                               also_print_to_console=True)
        if self.num_epochs <= self.warmup_epochs:
            self.print_to_log_file(f"WARNING: {self.num_epochs} epochs never leave the {self.warmup_epochs}-epoch "
                                   f"warm-up (the learning rate only reaches {self.num_epochs}/{self.warmup_epochs} of "
                                   f"its peak); set {ENV_WARMUP} lower for short runs", also_print_to_console=True)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """Called by nnU-Net for training and by ``nnUNetv2_predict``: the Primus of the spec stored in the plans."""
        spec = configuration_manager.configuration.get(PLANS_KEY)
        if spec is None:
            spec = resolve_recipe(cls.family, cls.backbone.key).network_spec()
        return build_primus_network(spec, configuration_manager, num_input_channels, num_output_channels)

    def _set_primus_lr(self, pretrained: bool) -> None:
        if not self.lr_from_recipe:
            self.initial_lr = PRETRAINED_LR if pretrained else SCRATCH_LR

    # --- initialisation --------------------------------------------------------------------------------
    def initialize(self):
        if not self.was_initialized:
            self._resolve_eva_checkpointing()
        super().initialize()

    def _resolve_eva_checkpointing(self) -> None:
        """``activation_checkpointing: auto`` -> on/off from the estimated training peak (AdamW: 2 state tensors per
        trainable parameter) of the network built on the meta device."""
        spec = self.configuration_manager.configuration[PLANS_KEY]
        if spec[CHECKPOINTING] != "auto":
            return
        from nnunet_tpp.models.memory import resolve_checkpointing
        self._set_batch_size_and_oversample()
        with torch.device("meta"):
            meta = build_primus_network({**spec, CHECKPOINTING: "off"}, self.configuration_manager,
                                        self._num_input_channels(), self.label_manager.num_segmentation_heads)
        shape = (self.batch_size, self._num_input_channels(), *self.configuration_manager.patch_size)
        resolved, reason = resolve_checkpointing("auto", meta, shape, self.device, optimizer_slots=2)
        spec = {**spec, CHECKPOINTING: resolved}
        self.configuration_manager.configuration[PLANS_KEY] = spec
        self.plans_manager.plans["configurations"][self.configuration_name][PLANS_KEY] = spec
        self.print_to_log_file(reason, also_print_to_console=True)

    def load_pretrained_backbone(self, path: str, record: bool = True) -> None:
        """Loads the checkpoint (base class), then moves to the fine-tuning learning rate (1e-4 unless the recipe
        sets one)."""
        super().load_pretrained_backbone(path, record)
        self._set_primus_lr(pretrained=True)
        if self.optimizer is not None:
            self.lr_scheduler = self._scheduler(self.optimizer)

    # --- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, self.initial_lr, weight_decay=self.weight_decay, betas=BETAS,
                                      fused=self.device.type in ("cuda", "cpu"))
        return optimizer, self._scheduler(optimizer)

    def _scheduler(self, optimizer):
        """The schedule of the current epoch's stage: linear warm-up, then poly decay from the end of the warm-up."""
        if self.current_epoch < self.warmup_epochs:
            self.training_stage = "warmup"
            return Lin_incr_LRScheduler(optimizer, self.initial_lr, self.warmup_epochs)
        self.training_stage = "train"
        return PolyLRScheduler_offset(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def on_train_epoch_start(self):
        if self.training_stage == "warmup" and self.current_epoch >= self.warmup_epochs:
            self.lr_scheduler = self._scheduler(self.optimizer)  # same optimiser: its moments carry on
            self.print_to_log_file(f"warm-up done: poly decay from lr {self.initial_lr}")
        super().on_train_epoch_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """The base class's safe ``--c`` loading, then the learning rate of the run (pre-trained when the fold
        records a backbone) and the schedule of the restored epoch."""
        super().load_checkpoint(filename_or_checkpoint)
        self._set_primus_lr(pretrained=self.recorded_backbone() is not None)
        self.lr_scheduler = self._scheduler(self.optimizer)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step with the Primus trainers' gradient clipping (norm 1)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(
            self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.loss(self.network(data), target)
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def set_deep_supervision_enabled(self, enabled: bool):
        """Primus has one output: nothing to switch."""

