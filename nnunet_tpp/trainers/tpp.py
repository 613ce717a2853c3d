"""TPP trainers: target parameter pre-training (DINO on the fold's own training images, backbone frozen,
only the PEFT method's new parameters train), then the usual supervised PEFT fine-tuning from exactly
those parameters. One class serves every method that adds parameters (``TPPConvAdapterTrainer``,
``TPPLoRATrainer``, ...).

In the fold folder: ``tpp_target_parameters.pth`` (the stage's result; a finished stage is never
repeated), ``tpp_state.pth`` (resumable state while it runs), ``tpp_progress.png`` (loss, KL and entropies per
epoch), ``tpp_diagnostics.json`` (the collapse diagnostics per epoch) and the base trainer's ``backbone.json``
(the ``-pretrained_weights`` file and its fingerprint, reloaded when ``--c`` resumes a pretext stage).

The state and the result record the backbone's fingerprint, method, options and architecture. A run reuses or
resumes them only when all four are this run's; otherwise it refuses before it changes any of the fold's files,
naming the files and how to go on (``--c`` continues the run they belong to; a new fold folder starts another).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from nnunet_tpp import peft
from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler, check_views, default_view_size
from nnunet_tpp.pretext.dino import DINOConfig, PretextSettingsError
from nnunet_tpp.pretext.stage import (EncoderEmbedding, PretextSchedule, TargetParameterError, check_file_identity,
                                      check_state,
                                      load_target_parameters, read_state, read_target_parameters, run_dino_stage,
                                      save_target_parameters, stage_settings)
from nnunet_tpp.trainers.base import ENV_TARGET_PARAMETERS, PeftTrainer

TPP_FILE = "tpp_target_parameters.pth"
TPP_STATE = "tpp_state.pth"
TPP_PLOT = "tpp_progress.png"
TPP_DIAGNOSTICS = "tpp_diagnostics.json"


class TPPFoldError(TargetParameterError):
    """The fold folder holds a pretext state or result of another backbone, method or options."""


class TPPTrainer(PeftTrainer):
    """A PEFT trainer whose supervised stage starts from pretext-trained target parameters."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net passes --c in the plans (and pops it); a fresh run and a continued one differ for the fold's files
        self.continue_training = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)

    # --- the backbone and the fold's files ------------------------------------------------------------------
    def check_loaded_backbone(self, path: str, training_run: bool = True) -> None:
        """For a training run: the fold's pretext files must come from this backbone (:meth:`check_fold_files`),
        checked before the base class records it in ``backbone.json`` (so a refusal leaves that record, which that
        run's ``--c`` reloads, as it was)."""
        if training_run:
            self.check_fold_files(path)

    def reloads_recorded_backbone(self) -> bool:
        """``--c`` of a run whose supervised stage has not started: :meth:`on_train_start` reloads the backbone
        recorded in ``backbone.json`` before anything else."""
        return (self.continue_training and self.current_epoch == 0 and not os.environ.get(ENV_TARGET_PARAMETERS)
                and bool((self.recorded_backbone() or {}).get("path")))

    def _fold_files(self) -> dict[str, str]:
        return {name: os.path.join(self.output_folder, name) for name in (TPP_STATE, TPP_FILE)
                if os.path.isfile(os.path.join(self.output_folder, name))}

    def check_fold_files(self, backbone: str | None, their_backbone: str | None = None) -> None:
        """Refuses to resume or reuse the fold's ``tpp_state.pth`` / ``tpp_target_parameters.pth`` unless they were
        made from this run's backbone (fingerprint), method, options and architecture.

        Args:
            backbone: the checkpoint this run loaded (None: a random backbone).
            their_backbone: the checkpoint the fold's files were made from, for the message (default: the one
                ``backbone.json`` names).
        Raises:
            TPPFoldError: naming the files, both backbones and how to proceed.
        """
        files = self._fold_files()
        if not files or os.environ.get(ENV_TARGET_PARAMETERS):  # (with a given file the fold's are not used)
            return
        net = peft.unwrap(self.network)
        problems, unverified = [], []
        for name, path in files.items():
            try:
                recorded = read_state(path)["identity"] if name == TPP_STATE else read_target_parameters(path)
                if not recorded.get("backbone"):
                    unverified.append(name)
                check_file_identity(recorded, net, path, "pretext-stage weights" if name == TPP_STATE else
                                    "target parameters")
            except TargetParameterError as e:
                problems.append(str(e))
        if unverified and not problems and not self.continue_training:
            problems.append(f"{', '.join(unverified)} record(s) no backbone fingerprint (an earlier version), so "
                            f"they cannot be shown to come from this backbone")
        if problems:
            recorded_backbone = their_backbone or self._recorded_backbone()
            raise TPPFoldError(
                f"the fold folder {self.output_folder} holds {' and '.join(files)} of another TPP run: "
                + "; ".join(p.rstrip(".") for p in problems)
                + f". This run's backbone: {backbone or 'random (no -pretrained_weights)'} "
                  f"({peft.backbone_fingerprint(net)})"
                + (f"; that run's backbone: {recorded_backbone}" if recorded_backbone else "")
                + ". To continue that run: nnUNetv2_train ... --c (without -pretrained_weights: its backbone is "
                  "reloaded). To pre-train with this backbone: use a new fold folder (another fold, plans or "
                  f"trainer name, or move {self.output_folder} away). The fold's files were left as they were.")
        for name in files:
            what = "resuming its pretext stage" if name == TPP_STATE else "reusing its pretext result"
            self.print_to_log_file(f"TPP: {files[name]} was made from this backbone, method and options: {what}",
                                   also_print_to_console=True)

    def _recorded_backbone(self) -> str | None:
        try:
            return (self.recorded_backbone() or {}).get("path")
        except ValueError:  # (an unreadable record names nothing)
            return None

    # --- training life cycle -----------------------------------------------------------------------------
    def on_train_start(self):
        if self.current_epoch == 0 and not os.environ.get(ENV_TARGET_PARAMETERS):
            # before nnU-Net starts its data loaders: the backbone (reloaded on --c), the fold's files, the settings
            if not self.was_initialized:
                self.initialize()
            net = peft.unwrap(self.network)
            if self.pretrained_report is None and self.continue_training and self._recorded_backbone():
                path = self._recorded_backbone()
                self.print_to_log_file(f"TPP: resuming; reloading the pre-trained backbone {path}",
                                       also_print_to_console=True)
                self.load_pretrained_backbone(path)
            if peft.backbone_fingerprint(net) is None:  # no -pretrained_weights: the random backbone
                peft.fingerprint_backbone(net)
                self.check_fold_files(None)
            if not os.path.isfile(os.path.join(self.output_folder, TPP_FILE)):
                self.check_resumable_state(os.path.join(self.output_folder, TPP_STATE))
        super().on_train_start()
        if self.current_epoch == 0:  # a resumed supervised stage has its parameters from its checkpoint
            self.prepare_target_parameters()

    def prepare_target_parameters(self) -> None:
        """Loads the target parameters fine-tuning starts from: the fold's finished pretext result, or a
        pretext stage run (or resumed) now. A file given with ``NNUNET_TPP_TARGET_PARAMETERS`` replaces both
        (loaded by the base class, as for every PEFT trainer)."""
        net = peft.unwrap(self.network)
        if os.environ.get(ENV_TARGET_PARAMETERS):
            return  # loaded by PeftTrainer.on_train_start; no pretext stage here
        result = os.path.join(self.output_folder, TPP_FILE)
        if os.path.isfile(result):
            self.print_to_log_file(f"TPP: pretext stage already finished ({result}); not repeated",
                                   also_print_to_console=True)
        elif self.local_rank == 0:  # with DDP one process runs the stage, the others wait for its result
            self.run_pretext_stage(result)
        if self.is_ddp:
            self._wait_for(result)
        load_target_parameters(net, result)
        self.print_to_log_file(f"TPP: supervised fine-tuning starts from the pre-trained target parameters "
                               f"in {result}", also_print_to_console=True)

    def _wait_for(self, result: str) -> None:
        """DDP: ranks other than 0 poll for the stage's result (a collective would time out during a long stage),
        then all meet."""
        import torch.distributed as dist
        while self.local_rank != 0 and not os.path.isfile(result):
            time.sleep(10)
        dist.barrier()

    # --- the pretext stage ---------------------------------------------------------------------------------
    def pretext_setup(self, check_cases: bool = True):
        """The stage's schedule, DINO recipe and views from the recipe, checked (before the stage starts).

        Returns:
            ``(schedule, dino, global_size, divisor, train_keys)``. Raises :class:`PretextSettingsError` for a
            batch below 1, views the plan's pooling does not divide or larger than a training case, a learning
            rate <= 0 or a min_lr not below it. A setup checked against the cases is kept: the stage that follows
            its check does not read every case's shape again.
        """
        if check_cases and getattr(self, "_checked_pretext_setup", None) is not None:
            return self._checked_pretext_setup
        r = self.recipe
        net = peft.unwrap(self.network)
        pools = getattr(net, "pool_op_kernel_sizes", None) or self.configuration_manager.pool_op_kernel_sizes
        divisor = [int(v) for v in np.prod(np.array(pools), axis=0)]
        patch = self.configuration_manager.patch_size
        view = tuple(r.pretext_view_size) if r.pretext_view_size else default_view_size(patch, divisor)
        schedule = PretextSchedule(epochs=int(r.pretext_epochs),
                                   iterations_per_epoch=int(r.pretext_iterations_per_epoch),
                                   batch_size=int(r.pretext_batch_size), feature_stages=tuple(r.pretext_feature_stages))
        temp = float(r.pretext_teacher_temp)
        dino = DINOConfig(lr=float(r.pretext_lr), min_lr=float(r.pretext_min_lr), keep=str(r.pretext_keep),
                          teacher_temp=temp, warmup_teacher_temp=temp)
        if schedule.epochs < 1 or schedule.iterations_per_epoch < 1:
            raise PretextSettingsError("pretext_epochs and pretext_iterations_per_epoch must be >= 1")
        dino.validate(schedule.batch_size)
        EncoderEmbedding(net, schedule.feature_stages)  # stages the network has (raises PretextSettingsError)
        train_keys, _ = self.do_split()
        shapes = None
        if check_cases:
            dataset = self.dataset_class(self.preprocessed_dataset_folder, train_keys)
            shapes = {k: tuple(dataset.load_case(k)[0].shape[1:]) for k in train_keys}
        check_views(view, divisor, shapes, schedule.batch_size)
        setup = schedule, dino, view, divisor, train_keys
        if check_cases:
            self._checked_pretext_setup = setup
        return setup

    def run_pretext_stage(self, result_file: str, files: dict[str, str] | None = None) -> None:
        """DINO on the fold's training cases (never its validation cases); writes ``result_file``.

        Args:
            files: where the state, plot and diagnostics go (default: the fold folder's ``tpp_*`` files).
        """
        files = files or {k: os.path.join(self.output_folder, v) for k, v in
                          (("state", TPP_STATE), ("plot", TPP_PLOT), ("diagnostics", TPP_DIAGNOSTICS))}
        schedule, dino, view, divisor, train_keys = self.pretext_setup()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, train_keys)
        sampler = MultiCropSampler(dataset, train_keys, view, divisor, MultiCropConfig(),
                                   seed=12345 + (0 if self.fold == "all" else int(self.fold)))
        net = peft.unwrap(self.network)
        targets = peft.target_parameters(net)
        reached = EncoderEmbedding(net, schedule.feature_stages).reached(targets)
        overlap = sampler.global_overlap()
        self.print_to_log_file(
            f"TPP: DINO pretext stage on {len(train_keys)} training cases: {schedule.epochs} epochs x "
            f"{schedule.iterations_per_epoch} iterations, batch {schedule.batch_size}, views "
            f"{sampler.cfg.n_global} x {list(sampler.global_size)} + {sampler.cfg.n_local} x "
            f"{list(sampler.local_size)} from one region per sample (two global views: mean IoU "
            f"{overlap['mean_iou']:.2f}, disjoint {100 * overlap['disjoint']:.0f} %); AdamW lr {dino.lr:g} -> "
            f"{dino.min_lr:g}, teacher temperature {dino.teacher_temp:g}; training "
            f"{sum(targets[n].numel() for n in reached)} of {sum(p.numel() for p in targets.values())} target "
            f"parameters (those in encoder stages <= {max(schedule.feature_stages)}) + DINO head, backbone frozen; "
            f"the result is the {dino.keep}'s", also_print_to_console=True)
        run_dino_stage(self.network, sampler.sample, schedule, dino, self.device, files["state"],
                       log=lambda m: self.print_to_log_file(m, also_print_to_console=True),
                       plot_file=files["plot"], diagnostics_file=files["diagnostics"],
                       settings=_view_settings(view, divisor))
        save_target_parameters(self.network, result_file, {"trainer_name": type(self).__name__,
                                                           "fold": self.fold})
        self.print_to_log_file(f"TPP: pretext stage finished; target parameters saved to {result_file}",
                               also_print_to_console=True)

    def check_resumable_state(self, state_file: str) -> None:
        """Checks the pretext settings (:meth:`pretext_setup`) and refuses a pretext state that this run could not
        resume (other identity or settings), before the stage starts."""
        schedule, dino, view, divisor, _ = self.pretext_setup()
        if os.path.isfile(state_file):
            check_state(read_state(state_file), peft.unwrap(self.network), state_file,
                        stage_settings(schedule, dino, _view_settings(view, divisor)))


def _view_settings(view, divisor) -> dict:
    from nnunet_tpp.pretext.crops3d import view_sizes
    g, loc = view_sizes(view, divisor)
    return {"views": {"global": list(g), "local": list(loc)}}
