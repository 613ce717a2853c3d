"""The one nnU-Net trainer class behind every trainer name of the package.

A trainer name (``ConvAdapterTrainer_S``, ``LoRATrainer_nnUNet`` ...) is this class with a family (which recipe:
PEFT method, learning rate) and a backbone (an STU-Net size, or the network the plans describe). The class hooks
into nnU-Net at the documented places: ``build_network_architecture`` (backbone + PEFT + memory paths, also used by
``nnUNetv2_predict``), ``initialize`` (checks before anything starts, ``activation_checkpointing: auto``,
pre-trained weights through our own safe loader), ``configure_optimizers`` (trainable parameters only),
``save_checkpoint`` (atomic), ``load_checkpoint`` (safe reading) and ``on_train_end`` (``peft_weights.pth``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_tpp import peft
from nnunet_tpp.models.lean import MemoryPaths, apply_memory_paths
from nnunet_tpp.peft.fingerprint import FINGERPRINT_ATTRIBUTE
from nnunet_tpp.trainers.backbones import Backbone, backbone_of
from nnunet_tpp.trainers.recipe import resolve_recipe
from nnunet_tpp.trainers.seeding import ENV_SEED, INIT_PHASE, data_workers, requested_seed, seed_generators

PEFT_WEIGHTS_FILE = "peft_weights.pth"
BACKBONE_RECORD = "backbone.json"
PLANS_KEY = "nnunet_tpp"
ENV_SKIP_VALIDATION = "NNUNET_TPP_SKIP_VALIDATION"
ENV_TARGET_PARAMETERS = "NNUNET_TPP_TARGET_PARAMETERS"


def build_network(spec: dict, configuration_manager, num_input_channels: int, num_output_channels: int,
                  enable_deep_supervision: bool = True) -> torch.nn.Module:
    """The backbone for an nnU-Net configuration with the PEFT method and memory paths of ``spec`` applied.

    Args:
        spec: ``{"size", "method", "options", "memory"}`` as produced by ``TrainerRecipe.network_spec``
            (``memory.activation_checkpointing`` already resolved to on/off; plans written before memory paths
            existed have no ``memory`` and get the plain network).
        configuration_manager: nnU-Net configuration (pool sizes, or the whole architecture for ``nnUNet``).
    Returns:
        The network (random backbone; load weights afterwards).
    """
    net = backbone_of(spec.get("size")).build(configuration_manager, num_input_channels, num_output_channels,
                                              enable_deep_supervision)
    peft.apply(net, spec["method"], **spec["options"])
    memory = spec.get("memory")
    if memory:
        paths = MemoryPaths.from_settings(memory)
        if paths.activation_checkpointing == "auto":  # resolved by the trainer once the device is known
            paths = dataclasses.replace(paths, activation_checkpointing="off")
        apply_memory_paths(net, paths)
    return net


class PeftTrainer(nnUNetTrainer):
    """nnU-Net trainer for a pre-trained backbone with a PEFT method (``recipes.yaml`` holds the families)."""

    family: ClassVar[str] = "ConvAdapterTrainer"
    backbone: ClassVar[Backbone] = backbone_of("B")
    expects_pretrained: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and torch.device(device).type == "cpu":
            # nnU-Net takes DDP to mean CUDA and moves every rank to cuda:<rank>; a process group on the CPU (gloo)
            # keeps the device the trainer was given
            self.device, self.grad_scaler = torch.device("cpu"), None
        self.recipe = resolve_recipe(self.family, self.backbone.key)
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
        self.seed = requested_seed()
        self.print_to_log_file(f"nnunet_tpp: {type(self).__name__} = {self.backbone.label(self.configuration_manager)}"
                               f" + {spec['method']} {spec['options']}; lr {self.initial_lr}, "
                               f"{self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations",
                               also_print_to_console=True)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """Called by nnU-Net for training and by ``nnUNetv2_predict``; reads the spec from the plans."""
        spec = configuration_manager.configuration.get(PLANS_KEY)
        if spec is None:
            spec = resolve_recipe(cls.family, cls.backbone.key).network_spec()
        return build_network(spec, configuration_manager, num_input_channels, num_output_channels,
                             enable_deep_supervision)

    # --- initialisation ------------------------------------------------------------------------------
    def initialize(self):
        """nnU-Net's ``initialize`` after the checks; under DDP on the CPU (gloo) the network is wrapped without
        ``device_ids``, which nnU-Net passes and only a CUDA module takes."""
        cpu_ddp = self.is_ddp and self.device.type == "cpu" and not self.was_initialized
        if not self.was_initialized:
            self.check_inputs()
            self._resolve_activation_checkpointing()
            self._route_pretrained_weights_to_our_loader()
            if self.seed is not None:
                seed_generators(self.seed, INIT_PHASE, self.local_rank)
        if cpu_ddp:
            self.is_ddp = False  # nnU-Net's own DDP wrapping is CUDA-only; done below
        try:
            super().initialize()
        finally:
            self.is_ddp = self.is_ddp or cpu_ddp
        if cpu_ddp:  # what nnU-Net does under DDP: the batch split over ranks, the DDP wrapper, the loss for DDP
            self._set_batch_size_and_oversample()
            settle_cpu_layout(self.network)
            self.network = torch.nn.parallel.DistributedDataParallel(self.network)
            self.loss = self._build_loss()
        net = peft.unwrap(self.network)
        self.print_to_log_file(str(peft.trainable_summary(net)), also_print_to_console=True)
        self.print_to_log_file(f"memory paths: {getattr(net, 'memory_paths', MemoryPaths(lean_norm_act=False)).label()}",
                               also_print_to_console=True)

    def check_inputs(self) -> None:
        """:meth:`check_before_training` for this trainer's plans (also when nnU-Net's Python API or a DDP worker
        builds the trainer without going through ``nnUNetv2_train``)."""
        self.check_before_training(self.plans_manager.plans, self.configuration_name, self.dataset_json)

    @classmethod
    def check_before_training(cls, plans: dict, configuration: str, dataset_json: dict,
                              pretrained_weights: str | None = None) -> None:
        """Everything that can be checked before the trainer exists (so before anything is written or any data
        loader starts), on a network built on the meta device (no memory):

        * the recipe (``NNUNET_TPP_RECIPE`` and the schedule variables) and ``NNUNET_TPP_SEED``;
        * ``pretrained_weights``: of the kind this backbone loads (an STU-Net checkpoint of this size, or an nnU-Net
          / nnssl checkpoint of these plans' network), every tensor present with its shape;
        * a file given with ``NNUNET_TPP_TARGET_PARAMETERS``: a target-parameter file of this method, options
          and architecture.

        Raises:
            ValueError (``RecipeError``, ``CheckpointError``, ``TargetParameterError``, ``PeftError``) naming the
            problem and the fix.
        """
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        requested_seed()
        manager = PlansManager(plans)
        config = manager.get_configuration(configuration)
        spec = resolve_recipe(cls.family, cls.backbone.key).network_spec()
        channels = determine_num_input_channels(manager, config, dataset_json)
        with torch.device("meta"):
            meta = build_network({**spec, "memory": None}, config, channels,
                                 manager.get_label_manager(dataset_json).num_segmentation_heads, True)
        if pretrained_weights:
            cls.backbone.load(meta, pretrained_weights, set(peft.target_parameters(meta)), check_only=True)
        given = os.environ.get(ENV_TARGET_PARAMETERS)
        if given:
            from nnunet_tpp.models import file_kinds
            from nnunet_tpp.pretext.stage import TargetParameterError
            try:
                payload = file_kinds.load_expected(given, file_kinds.TARGET_PARAMETERS, role=ENV_TARGET_PARAMETERS,
                                                   mmap=True)
            except file_kinds.FileKindError as e:
                raise TargetParameterError(str(e)) from None
            try:
                peft.check_identity({k: payload.get(k) for k in ("method", "options", "architecture")},
                                    peft.identity(meta), given, "target parameters")
            except peft.PeftError as e:
                raise TargetParameterError(f"{e} ({ENV_TARGET_PARAMETERS}; pick the trainer of that method and "
                                           f"backbone, or pre-train target parameters for this one with "
                                           f"`nnunet-tpp pretrain`)") from None

    def _num_input_channels(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

    def _resolve_activation_checkpointing(self) -> None:
        """``activation_checkpointing: auto`` -> on/off from the estimated training peak on this device (a network
        built on the meta device: no memory used)."""
        spec = self.configuration_manager.configuration[PLANS_KEY]
        memory = spec.get("memory") or {}
        if memory.get("activation_checkpointing") != "auto":
            return
        from nnunet_tpp.models.memory import resolve_checkpointing
        self._set_batch_size_and_oversample()
        with torch.device("meta"):
            meta = build_network({**spec, "memory": {**memory, "activation_checkpointing": "off"}},
                                 self.configuration_manager, self._num_input_channels(),
                                 self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        shape = (self.batch_size, self._num_input_channels(), *self.configuration_manager.patch_size)
        resolved, reason = resolve_checkpointing("auto", meta, shape, self.device)
        memory = {**memory, "activation_checkpointing": resolved}
        spec["memory"] = memory
        self.plans_manager.plans["configurations"][self.configuration_name][PLANS_KEY] = spec
        self.print_to_log_file(reason, also_print_to_console=True)

    def _route_pretrained_weights_to_our_loader(self) -> None:
        """nnU-Net's ``-pretrained_weights`` loader unpickles arbitrarily and cannot read published STU-Net
        checkpoints (v1 files, ``seg_outputs`` heads). ``nnunetv2.run.run_training`` calls it right after
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

    def load_pretrained_backbone(self, path: str, record: bool = True) -> None:
        """Loads the pre-trained checkpoint into the backbone, logs what was loaded, skipped and newly initialised,
        fingerprints the backbone, runs :meth:`check_loaded_backbone` and (``record``) records path and fingerprint
        in the fold's ``backbone.json``. Modules the checkpoint lacks (an nnssl checkpoint's decoder) train with the
        heads: the optimiser is rebuilt for them."""
        net = peft.unwrap(self.network)
        self.pretrained_report = self.backbone.load(net, path, set(peft.target_parameters(net)))
        for line in self.pretrained_report.lines():
            self.print_to_log_file(line, also_print_to_console=True)
        self._train_new_modules(self.pretrained_report.new_modules)
        fingerprint = peft.fingerprint_backbone(net)
        self.check_loaded_backbone(path, record)
        if record and self.local_rank == 0:
            _atomic_json({"path": os.path.abspath(path), "fingerprint": fingerprint,
                          "new_modules": self.pretrained_report.new_modules},
                         os.path.join(self.output_folder, BACKBONE_RECORD))

    def check_loaded_backbone(self, path: str, training_run: bool = True) -> None:
        """Checks that need the loaded (fingerprinted) backbone, before it is recorded or anything trains; raises to
        refuse (base: nothing; the TPP trainers check the fold's pretext files against it). ``training_run`` is
        False for ``nnunet-tpp pretrain``, which leaves the fold folder alone."""

    def reloads_recorded_backbone(self) -> bool:
        """True when this run will load its backbone from ``backbone.json`` itself (a resumed TPP pretext stage);
        base: False."""
        return False

    def recorded_backbone(self) -> dict | None:
        """The fold folder's ``backbone.json`` (the checkpoint this run started from and its fingerprint), if any."""
        path = os.path.join(self.output_folder, BACKBONE_RECORD)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _train_new_modules(self, new_modules: list[str]) -> None:
        """Makes the modules a checkpoint did not hold (an nnssl checkpoint's decoder) train with the heads, and
        rebuilds the optimiser for them."""
        net = peft.unwrap(self.network)
        missing = [m for m in new_modules if m not in net.head_prefixes]
        if not missing:
            return
        net.head_prefixes = (*net.head_prefixes, *missing)
        peft.freeze(net)
        self._rebuild_optimizer()
        self.print_to_log_file(f"{', '.join(missing)}: not in the pre-trained checkpoint, trained with the heads; "
                               f"{peft.trainable_summary(net)}", also_print_to_console=True)

    def _rebuild_optimizer(self) -> None:
        if self.is_ddp:
            raise RuntimeError("this checkpoint holds only an encoder, so the decoder must train; with DDP give the "
                               "decoder to the recipe from the start (train it once with -num_gpus 1, or use a full "
                               "nnU-Net checkpoint)")
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # --- training life cycle -------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        if self.seed is not None:
            workers = data_workers()
            self.print_to_log_file(
                f"{ENV_SEED}={self.seed}: initialisation and every epoch seeded" + (
                    "" if workers == 0 else f"; but nnU-Net draws the batches in {workers} worker process(es) that "
                    f"seed themselves, so they differ between runs: set nnUNet_n_proc_DA=0 for reproducible runs"),
                also_print_to_console=True)
        given = os.environ.get(ENV_TARGET_PARAMETERS)
        if given and self.current_epoch == 0:
            from nnunet_tpp.pretext.stage import load_target_parameters
            load_target_parameters(self.network, given)
            self.print_to_log_file(f"fine-tuning starts from the pre-trained target parameters in {given} "
                                   f"({ENV_TARGET_PARAMETERS})", also_print_to_console=True)
        if (self.expects_pretrained and self.pretrained_report is None and self.current_epoch == 0
                and not self.reloads_recorded_backbone()):
            self.print_to_log_file(
                f"WARNING: {type(self).__name__} adapts a pre-trained backbone, but no -pretrained_weights "
                f"were given: the backbone is random. Pass {self.backbone.checkpoint_hint()}",
                also_print_to_console=True)

    def on_train_epoch_start(self):
        if self.seed is not None:  # the epoch's batches depend on (seed, epoch) only, so --c continues them
            seed_generators(self.seed, self.current_epoch, self.local_rank)
        super().on_train_epoch_start()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed, so a kill never leaves half a file."""
        tmp = f"{filename}.tmp-{os.getpid()}"
        super().save_checkpoint(tmp)
        if os.path.exists(tmp):
            os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``--c`` / validation loading, but reading the file with ``weights_only=True`` and the numpy
        allow-list (nnU-Net's own loader unpickles arbitrarily)."""
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            from nnunet_tpp.models import file_kinds
            from nnunet_tpp.models.stunet_checkpoint import read_checkpoint
            checkpoint = read_checkpoint(checkpoint, expected=file_kinds.NNUNET_CHECKPOINT)
        if not self.was_initialized:
            self.initialize()
        recorded = self.recorded_backbone() or {}
        self._train_new_modules(recorded.get("new_modules", []))
        self._restore_training_state(checkpoint)
        if recorded.get("fingerprint"):  # the run started from this backbone (its checkpoint holds it)
            setattr(peft.unwrap(self.network), FINGERPRINT_ATTRIBUTE, recorded["fingerprint"])

    def _restore_training_state(self, checkpoint: dict) -> None:
        """Puts an nnU-Net checkpoint dict back into this trainer, as nnU-Net's ``load_checkpoint`` does for a
        file (its 2.8.1 code cannot take a dict): weights (``module.`` prefixes dropped), epoch, logger, EMA,
        mirroring axes, optimizer and grad-scaler state."""
        network = peft.unwrap(self.network)
        own_keys = network.state_dict().keys()
        weights = {}
        for key, value in checkpoint["network_weights"].items():
            if key not in own_keys and key.startswith("module."):
                key = key[len("module."):]
            weights[key] = value
        network.load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

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
                "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
                "new_modules": list(getattr(self.pretrained_report, "new_modules", []) or
                                    (self.recorded_backbone() or {}).get("new_modules", []))})
            self.print_to_log_file(f"adapter-only weights (trained parameters + heads): {path} "
                                   f"({os.path.getsize(path) / 2**20:.1f} MB)", also_print_to_console=True)


def settle_cpu_layout(network: torch.nn.Module) -> None:
    """Puts a network that runs channels-last on the CPU (STU-Net with ``fast_cpu_kernels``, which converts its
    weights on its first CPU forward pass) into that layout now. DDP records every parameter's strides when it wraps
    the network, and a parameter whose strides change afterwards gets a wrong gradient (torch only warns: "the
    param's strides changed since DDP was constructed"), so call this before wrapping DDP on the CPU."""
    if getattr(network, "fast_cpu_kernels", False):
        network.to(memory_format=torch.channels_last_3d)


def _atomic_json(data: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
