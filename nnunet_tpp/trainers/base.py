"""The one nnU-Net trainer class behind every trainer name of the package.

A trainer name (``ConvAdapterTrainer_S`` ...) is this class with a family (which recipe: PEFT method,
learning rate) and an STU-Net size. The class hooks into nnU-Net at the documented places:
``build_network_architecture`` (STU-Net + PEFT, also used by ``nnUNetv2_predict``), ``initialize``
(pre-trained weights through our own safe loader), ``configure_optimizers`` (trainable parameters only),
``save_checkpoint`` (atomic) and ``on_train_end`` (``peft_weights.pth``).
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_tpp import peft
from nnunet_tpp.models.stunet import stunet_from_plans
from nnunet_tpp.models.stunet_checkpoint import load_stunet_checkpoint
from nnunet_tpp.trainers.recipe import resolve_recipe

PEFT_WEIGHTS_FILE = "peft_weights.pth"
PLANS_KEY = "nnunet_tpp"
ENV_SKIP_VALIDATION = "NNUNET_TPP_SKIP_VALIDATION"
ENV_TARGET_PARAMETERS = "NNUNET_TPP_TARGET_PARAMETERS"


def build_network(spec: dict, configuration_manager, num_input_channels: int, num_output_channels: int,
                  enable_deep_supervision: bool = True) -> torch.nn.Module:
    """STU-Net for an nnU-Net configuration with the PEFT method of ``spec`` applied.

    Args:
        spec: ``{"size", "method", "options"}`` as produced by ``TrainerRecipe.network_spec``.
        configuration_manager: nnU-Net configuration (pool sizes).
    Returns:
        The network (random backbone; load weights afterwards).
    """
    net = stunet_from_plans(spec["size"], configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision)
    peft.apply(net, spec["method"], **spec["options"])
    return net


class STUNetPeftTrainer(nnUNetTrainer):
    """nnU-Net trainer for STU-Net with a PEFT method (see ``recipes.yaml`` for the families)."""

    family: ClassVar[str] = "ConvAdapterTrainer"
    stunet_size: ClassVar[str] = "B"
    expects_pretrained: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe = resolve_recipe(self.family, self.stunet_size)
        spec = self.recipe.network_spec()
        # plans are data: the network spec travels with plans.json to nnUNetv2_predict
        self.plans_manager.plans["configurations"][configuration][PLANS_KEY] = spec
        self.configuration_manager.configuration[PLANS_KEY] = spec
        self.initial_lr = float(self.recipe.initial_lr)
        self.weight_decay = float(self.recipe.weight_decay)
        if self.recipe.epochs:
            self.num_epochs = int(self.recipe.epochs)
        if self.recipe.iterations_per_epoch:
            self.num_iterations_per_epoch = int(self.recipe.iterations_per_epoch)
        if self.recipe.val_iterations_per_epoch:
            self.num_val_iterations_per_epoch = int(self.recipe.val_iterations_per_epoch)
        self.pretrained_report = None
        self.print_to_log_file(f"nnunet_tpp: {type(self).__name__} = STU-Net-{self.stunet_size} + "
                               f"{spec['method']} {spec['options']}; lr {self.initial_lr}, "
                               f"{self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations",
                               also_print_to_console=True)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """Called by nnU-Net for training and by ``nnUNetv2_predict``; reads the spec from the plans."""
        spec = configuration_manager.configuration.get(PLANS_KEY)
        if spec is None:
            spec = resolve_recipe(cls.family, cls.stunet_size).network_spec()
        return build_network(spec, configuration_manager, num_input_channels, num_output_channels,
                             enable_deep_supervision)

    # --- initialisation ------------------------------------------------------------------------------
    def initialize(self):
        if not self.was_initialized:
            self._route_pretrained_weights_to_our_loader()
        super().initialize()
        self.print_to_log_file(str(peft.trainable_summary(self.network)), also_print_to_console=True)

    def _route_pretrained_weights_to_our_loader(self) -> None:
        """nnU-Net's ``-pretrained_weights`` loader cannot read published STU-Net checkpoints (v1 files,
        ``seg_outputs`` heads, unsafe unpickling). ``nnunetv2.run.run_training`` calls it right after
        ``initialize``; for our network we route that call to :meth:`load_pretrained_backbone`."""
        import nnunetv2.run.run_training as run_training

        original = getattr(run_training.load_pretrained_weights, "nnunet_original",
                           run_training.load_pretrained_weights)
        trainer = self

        def load_pretrained_weights(network, fname, verbose=False):
            if trainer.network is None or peft.unwrap(network) is not peft.unwrap(trainer.network):
                return original(network, fname, verbose)
            trainer.load_pretrained_backbone(fname)

        load_pretrained_weights.nnunet_original = original
        run_training.load_pretrained_weights = load_pretrained_weights

    def load_pretrained_backbone(self, path: str) -> None:
        """Loads a published STU-Net checkpoint (v1 ``.model`` or v2 ``.pth``) into the backbone and logs
        which tensors were loaded, skipped and newly initialised."""
        net = peft.unwrap(self.network)
        self.pretrained_report = load_stunet_checkpoint(net, path, new_keys=set(peft.target_parameters(net)))
        for line in self.pretrained_report.lines():
            self.print_to_log_file(line, also_print_to_console=True)

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # --- training life cycle -------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        given = os.environ.get(ENV_TARGET_PARAMETERS)
        if given and self.current_epoch == 0:
            from nnunet_tpp.pretext.stage import load_target_parameters
            load_target_parameters(self.network, given)
            self.print_to_log_file(f"fine-tuning starts from the pre-trained target parameters in {given} "
                                   f"({ENV_TARGET_PARAMETERS})", also_print_to_console=True)
        if self.expects_pretrained and self.pretrained_report is None and self.current_epoch == 0:
            self.print_to_log_file(
                f"WARNING: {type(self).__name__} adapts a pre-trained backbone, but no -pretrained_weights "
                f"were given: the backbone is random. Pass -pretrained_weights STUNet_{self.stunet_size}.model",
                also_print_to_console=True)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed, so a kill never leaves half a file."""
        tmp = f"{filename}.tmp-{os.getpid()}"
        super().save_checkpoint(tmp)
        if os.path.exists(tmp):
            os.replace(tmp, filename)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(ENV_SKIP_VALIDATION, "").lower() in ("1", "true", "yes"):
            self.print_to_log_file(f"{ENV_SKIP_VALIDATION} is set: skipping nnU-Net's final validation",
                                   also_print_to_console=True)
            return
        super().perform_actual_validation(save_probabilities)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing:
            path = os.path.join(self.output_folder, PEFT_WEIGHTS_FILE)
            peft.save(self.network, path, extra={
                "trainer_name": type(self).__name__, "configuration": self.configuration_name,
                "plans_name": self.plans_manager.plans_name, "fold": self.fold,
                "num_input_channels": self.num_input_channels,
                "num_output_channels": self.label_manager.num_segmentation_heads,
                "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes})
            self.print_to_log_file(f"adapter-only weights (trained parameters + heads): {path} "
                                   f"({os.path.getsize(path) / 2**20:.1f} MB)", also_print_to_console=True)
