"""TPP trainers: target parameter pre-training (a pretext stage on the fold's own training images -- masked
reconstruction (``pretext: mae``) or DINO (``pretext: dino``) --, backbone frozen, only the PEFT method's new
parameters and the pretext's head train), then the usual supervised PEFT fine-tuning from exactly those parameters.
One class serves every method that adds parameters (``TPPConvAdapterTrainer``, ``TPPLoRATrainer``, ...).

In the fold folder: ``tpp_target_parameters.pth`` (the stage's result; a finished stage is never
repeated), ``tpp_initial_target_parameters.pth`` (the target parameters before the stage), ``tpp_state.pth``
(resumable state while it runs), ``tpp_progress.png`` and ``tpp_diagnostics.json`` (per epoch: DINO's loss, KL and
collapse entropies, or the masked-voxel loss), with ``pretext_control: true`` ``tpp_control_state.pth`` and
``tpp_target_check.json`` (:mod:`nnunet_tpp.pretext.check`), and the base trainer's ``backbone.json`` (the
``-pretrained_weights`` file and its fingerprint, reloaded when ``--c`` resumes a pretext stage).

The views are cut in ``pretext_workers`` background processes (nnU-Net's ``nnUNet_n_proc_DA`` by default), fixed by
step and sample (the same for any number of workers or DDP ranks, and for a resumed stage). Under DDP every rank runs
the stage on its share of each batch (gradients averaged, DINO's centre and statistics pooled); rank 0 writes the
files.

The state and the result record the backbone's fingerprint, method, options and architecture. A run reuses or
resumes them only when all four are this run's; otherwise it refuses before it changes any of the fold's files,
naming the files and how to go on (``--c`` continues the run they belong to; a new fold folder starts another).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from nnunet_tpp import peft
from nnunet_tpp.pretext.check import CHECK_FILE, run_stage, target_check
from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler, check_views, default_view_size
from nnunet_tpp.pretext.dino import DINOConfig, PretextSettingsError
from nnunet_tpp.pretext.distributed import barrier, is_main
from nnunet_tpp.pretext.feed import default_workers, fixed_set
from nnunet_tpp.pretext.masked import MaskedConfig
from nnunet_tpp.pretext.masked_tokens import token_sites
from nnunet_tpp.pretext.masked_views import MaskedViewSampler, check_mask_settings
from nnunet_tpp.pretext.stage import (PretextSchedule, TargetParameterError, check_file_identity, check_state,
                                      load_target_parameters, network_embedding, read_state,
                                      read_target_parameters, save_target_parameters, stage_settings)
from nnunet_tpp.trainers.base import ENV_TARGET_PARAMETERS, PeftTrainer

TPP_FILE = "tpp_target_parameters.pth"
TPP_INITIAL = "tpp_initial_target_parameters.pth"
TPP_STATE = "tpp_state.pth"
TPP_CONTROL_STATE = "tpp_control_state.pth"
TPP_PLOT = "tpp_progress.png"
TPP_DIAGNOSTICS = "tpp_diagnostics.json"
TPP_CHECK = CHECK_FILE
DEFAULT_BATCH = {"dino": 8, "mae": 2}
SEED = 12345


@dataclass
class PretextPlan:
    """The checked settings of a TPP stage (:meth:`TPPTrainer.pretext_setup`).

    Attributes:
        pretext: ``mae`` or ``dino``.
        schedule: epochs, iterations, batch (over all ranks), DINO's feature stages.
        cfg: :class:`MaskedConfig` or :class:`DINOConfig`.
        view: the view size (DINO: the global views').
        divisor: the product of the network's pool sizes per axis.
        stage_keys: the training cases the stage draws from.
        eval_keys: the training cases of the control's evaluation set (empty without ``pretext_control``).
        workers: background processes cutting the views.
    """

    pretext: str
    schedule: PretextSchedule
    cfg: object
    view: tuple
    divisor: list
    stage_keys: list
    eval_keys: list
    workers: int

    @property
    def control(self) -> bool:
        """Whether the head-only control and the target check run."""
        return bool(self.eval_keys)


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

    def _pretext_cases(self, names: list[str]) -> list[str]:
        """The recipe's ``pretext_cases``, checked against the preprocessed dataset (raises
        :class:`PretextSettingsError` naming the cases it lacks)."""
        known = set(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        missing = sorted(set(names) - known)
        if missing:
            raise PretextSettingsError(f"pretext_cases names {len(missing)} case(s) that the preprocessed dataset "
                                       f"{self.preprocessed_dataset_folder} lacks: {', '.join(missing[:10])}; give "
                                       f"names of its training cases (or leave pretext_cases out: the fold's)")
        return sorted(set(names))

    def _fold_files(self) -> dict[str, str]:
        return {name: os.path.join(self.output_folder, name)
                for name in (TPP_STATE, TPP_CONTROL_STATE, TPP_FILE, TPP_INITIAL)
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
                is_state = name in (TPP_STATE, TPP_CONTROL_STATE)
                recorded = read_state(path)["identity"] if is_state else read_target_parameters(path)
                if not recorded.get("backbone"):
                    unverified.append(name)
                check_file_identity(recorded, net, path, "pretext-stage weights" if is_state else
                                    "target parameters")
            except TargetParameterError as e:
                problems.append(str(e))
        if unverified and not problems and not self.continue_training:
            problems.append(f"{', '.join(unverified)} record(s) no backbone fingerprint (an earlier version), so "
                            f"they cannot be shown to come from this backbone")
        if problems:
            recorded_backbone = their_backbone or self._recorded_backbone()
            raise TPPFoldError(
                f"the fold folder {self.output_folder} holds {_listed(list(files))} of another TPP run: "
                + "; ".join(p.rstrip(".") for p in problems)
                + f". This run's backbone: {backbone or 'random (no -pretrained_weights)'} "
                  f"({peft.backbone_fingerprint(net)})"
                + (f"; that run's backbone: {recorded_backbone}" if recorded_backbone else "")
                + ". To continue that run: nnUNetv2_train ... --c (without -pretrained_weights: its backbone is "
                  "reloaded). To pre-train with this backbone: use a new fold folder (another fold, plans or "
                  f"trainer name, or move {self.output_folder} away). The fold's files were left as they were.")
        for name in files:
            what = {TPP_STATE: "resuming its pretext stage", TPP_CONTROL_STATE: "resuming its head-only control",
                    TPP_FILE: "reusing its pretext result", TPP_INITIAL: "its target parameters' initialisation"}[name]
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
        pretext stage run (or resumed) now; with ``pretext_control`` also the head-only control and the target check
        (run, resumed, or already written). A file given with ``NNUNET_TPP_TARGET_PARAMETERS`` replaces all of it
        (loaded by the base class, as for every PEFT trainer). Under DDP every rank takes part."""
        net = peft.unwrap(self.network)
        if os.environ.get(ENV_TARGET_PARAMETERS):
            return  # loaded by PeftTrainer.on_train_start; no pretext stage here
        result = os.path.join(self.output_folder, TPP_FILE)
        files = self.pretext_files()
        if os.path.isfile(result):
            self.print_to_log_file(f"TPP: pretext stage already finished ({result}); not repeated",
                                   also_print_to_console=True)
            if self.pretext_setup().control and not os.path.isfile(files["check"]):
                load_target_parameters(net, result)
                self.run_target_check(files)
        else:
            self.run_pretext_stage(result, files)
        barrier()
        load_target_parameters(net, result)
        self.print_to_log_file(f"TPP: supervised fine-tuning starts from the pre-trained target parameters "
                               f"in {result}", also_print_to_console=True)

    def pretext_files(self, root: str | None = None) -> dict[str, str]:
        """Where the stage writes: ``{"state", "plot", "diagnostics", "initial", "control_state", "check"}`` (the
        fold folder's ``tpp_*`` files)."""
        root = root or self.output_folder
        return {k: os.path.join(root, v) for k, v in (
            ("state", TPP_STATE), ("plot", TPP_PLOT), ("diagnostics", TPP_DIAGNOSTICS), ("initial", TPP_INITIAL),
            ("control_state", TPP_CONTROL_STATE), ("check", TPP_CHECK))}

    # --- the pretext stage ---------------------------------------------------------------------------------
    def pretext_setup(self, check_cases: bool = True) -> PretextPlan:
        """The stage's pretext, schedule, recipe, views and cases from the recipe, checked (before the stage starts).

        Returns:
            A :class:`PretextPlan`. Raises :class:`PretextSettingsError` for a batch below 1 (or below the number
            of processes), views the plan's pooling does not divide (or, for DINO, larger than a training case), a
            learning rate <= 0 or a DINO ``min_lr`` not below it, a mask that masks nothing, and ``pretext_control``
            with fewer than 2 training cases. A setup checked against the cases is kept: the stage that follows its
            check does not read every case's shape again.
        """
        if check_cases and getattr(self, "_checked_pretext_setup", None) is not None:
            return self._checked_pretext_setup
        r = self.recipe
        net = peft.unwrap(self.network)
        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        pretext = r.pretext
        tokens = token_sites(net)
        if tokens is not None:  # a token network (Primus) takes exactly the input it was built for
            divisor = [tokens.patch] * len(patch)
            if r.pretext_view_size and tuple(int(v) for v in r.pretext_view_size) != patch:
                raise PretextSettingsError(f"{type(net).__name__} takes only its patch {list(patch)}: remove "
                                           f"pretext_view_size {list(r.pretext_view_size)} from the recipe")
        else:
            pools = getattr(net, "pool_op_kernel_sizes", None) or self.configuration_manager.pool_op_kernel_sizes
            divisor = [int(v) for v in np.prod(np.array(pools), axis=0)]
        if r.pretext_view_size:
            view = tuple(int(v) for v in r.pretext_view_size)
        else:
            view = default_view_size(patch, divisor) if pretext == "dino" and tokens is None else patch
        batch = int(r.pretext_batch_size) if r.pretext_batch_size is not None else DEFAULT_BATCH[pretext]
        schedule = PretextSchedule(epochs=int(r.pretext_epochs),
                                   iterations_per_epoch=int(r.pretext_iterations_per_epoch),
                                   batch_size=batch, feature_stages=tuple(r.pretext_feature_stages))
        if schedule.epochs < 1 or schedule.iterations_per_epoch < 1:
            raise PretextSettingsError("pretext_epochs and pretext_iterations_per_epoch must be >= 1")
        if pretext == "dino":
            temp = float(r.pretext_teacher_temp)
            cfg = DINOConfig(min_lr=float(r.pretext_min_lr), keep=str(r.pretext_keep), teacher_temp=temp,
                             warmup_teacher_temp=temp, teacher_mode=str(r.pretext_teacher_mode),
                             clip=str(r.pretext_clip), **({} if r.pretext_lr is None else {"lr": float(r.pretext_lr)}))
            cfg.validate(schedule.batch_size)
            network_embedding(net, schedule.feature_stages, view)  # stages it has (raises PretextSettingsError)
        else:
            cfg = MaskedConfig.for_network(
                net, mask_ratio=float(r.pretext_mask_ratio), lr=None if r.pretext_lr is None else float(r.pretext_lr),
                block_size=None if r.pretext_mask_block is None else int(r.pretext_mask_block),
                optimizer=None if r.pretext_optimizer is None else str(r.pretext_optimizer))
            cfg.validate()
            check_mask_settings(cfg.mask_ratio, cfg.block_size, view)
            if tokens is not None and cfg.block_size % tokens.patch:
                raise PretextSettingsError(f"pretext_mask_block {cfg.block_size} does not cover whole "
                                           f"{tokens.patch}-voxel tokens of {type(net).__name__}: give a multiple "
                                           f"of {tokens.patch} (or leave it out: one token, as nnssl)")
        train_keys, _ = self.do_split()
        if r.pretext_cases is not None:
            train_keys = self._pretext_cases(r.pretext_cases)
        stage_keys, eval_keys = list(train_keys), []
        if r.pretext_control:
            if len(train_keys) < 2:
                raise PretextSettingsError(
                    f"pretext_control needs at least 2 training cases (the control's evaluation views come from "
                    f"training cases the stage does not draw); this fold has {len(train_keys)}")
            order = np.random.default_rng(SEED).permutation(sorted(train_keys))
            n_eval = max(1, int(round(float(r.pretext_eval_cases) * len(train_keys))))
            n_eval = min(n_eval, len(train_keys) - 1)
            eval_keys = sorted(str(k) for k in order[:n_eval])
            stage_keys = [k for k in train_keys if k not in eval_keys]
        shapes = None
        if check_cases and pretext == "dino":
            dataset = self.dataset_class(self.preprocessed_dataset_folder, train_keys)
            shapes = {k: tuple(dataset.load_case(k)[0].shape[1:]) for k in train_keys}
        # (a token network's view is its patch, which it was built for: one token per axis is enough)
        check_views(view, divisor if tokens is None else [1] * len(view), shapes, schedule.batch_size)
        workers = int(r.pretext_workers) if r.pretext_workers is not None else default_workers()
        setup = PretextPlan(pretext, schedule, cfg, view, divisor, stage_keys, eval_keys, workers)
        if check_cases:
            self._checked_pretext_setup = setup
        return setup

    def pretext_sources(self, plan: PretextPlan):
        """``(stage source, evaluation source or None)``: the view samplers of the stage's and the evaluation
        cases."""
        seed = SEED + (0 if self.fold == "all" else int(self.fold))

        def sampler(keys, offset):
            dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
            if plan.pretext == "dino":
                return MultiCropSampler(dataset, keys, plan.view, plan.divisor, MultiCropConfig(), seed=seed + offset)
            return MaskedViewSampler(dataset, keys, plan.view, plan.cfg.block_size, plan.cfg.mask_ratio,
                                     seed=seed + offset)
        return sampler(plan.stage_keys, 0), (sampler(plan.eval_keys, 1000) if plan.control else None)

    def run_pretext_stage(self, result_file: str, files: dict[str, str] | None = None) -> None:
        """The pretext stage on the fold's training cases (never its validation cases; with ``pretext_control``
        not the evaluation cases either); writes ``result_file`` (rank 0), then runs the target check when asked.

        Args:
            files: where the state, plot, diagnostics, initial parameters, control state and check go (default:
                :meth:`pretext_files`).
        """
        files = files or self.pretext_files()
        plan = self.pretext_setup()
        net = peft.unwrap(self.network)
        self._keep_initial(files["initial"], files["state"])
        source, _ = self.pretext_sources(plan)
        targets = peft.target_parameters(net)
        schedule = plan.schedule
        if plan.pretext == "dino":
            reached = self.pretext_embedding(plan).reached(targets)
            overlap = source.global_overlap()
            what = (f"DINO pretext stage on {len(plan.stage_keys)} training cases: views {source.cfg.n_global} x "
                    f"{list(source.global_size)} + {source.cfg.n_local} x {list(source.local_size)} from one region "
                    f"per sample (two global views: mean IoU {overlap['mean_iou']:.2f}, disjoint "
                    f"{100 * overlap['disjoint']:.0f} %); AdamW lr {plan.cfg.peak_lr(schedule.batch_size):g} -> "
                    f"{plan.cfg.min_lr:g}, teacher temperature {plan.cfg.teacher_temp:g}; training "
                    f"{sum(targets[n].numel() for n in reached)} of {sum(p.numel() for p in targets.values())} "
                    + ("target parameters + DINO head on the mean patch token (views resized to the patch "
                       f"{list(plan.view)})" if token_sites(net) is not None else
                       f"target parameters (those in encoder stages <= {max(schedule.feature_stages)}) + DINO head")
                    + f"; the result is the {plan.cfg.keep}'s")
        else:
            tokens = token_sites(net) is not None
            what = (f"masked-reconstruction pretext stage on {len(plan.stage_keys)} training cases: views "
                    f"{list(plan.view)}, {100 * plan.cfg.mask_ratio:.0f} % of {plan.cfg.block_size}-voxel blocks "
                    f"masked{' (their tokens replaced by a learned mask token)' if tokens else ''}; "
                    f"{plan.cfg.optimizer.upper()} lr {plan.cfg.lr:g} (polynomial decay); training "
                    f"{sum(p.numel() for p in targets.values())} target parameters + the output layer"
                    f"{' and the mask token' if tokens else ''}")
        self.print_to_log_file(
            f"TPP: {what}; {schedule.epochs} epochs x {schedule.iterations_per_epoch} iterations, batch "
            f"{schedule.batch_size}, {plan.workers} background worker(s); backbone frozen"
            + (f"; evaluation cases for the target check: {', '.join(plan.eval_keys)}" if plan.control else ""),
            also_print_to_console=True)
        run_stage(plan.pretext, self.network, source, schedule, plan.cfg, self.device, files["state"],
                  log=lambda m: self.print_to_log_file(m, also_print_to_console=True), plot_file=files["plot"],
                  diagnostics_file=files["diagnostics"], settings=self._stage_settings_extra(plan),
                  workers=plan.workers, compile=self._do_i_compile(), **self._embedding_kwargs(plan))
        if is_main():
            save_target_parameters(self.network, result_file, {"trainer_name": type(self).__name__,
                                                               "fold": self.fold, "pretext": plan.pretext})
        barrier()
        self.print_to_log_file(f"TPP: pretext stage finished; target parameters saved to {result_file}",
                               also_print_to_console=True)
        if plan.control:
            self.run_target_check(files)

    def run_target_check(self, files: dict[str, str]) -> dict:
        """The head-only control and ``tpp_target_check.json`` (:func:`nnunet_tpp.pretext.check.target_check`) for
        the network's present target parameters (the stage's result)."""
        plan = self.pretext_setup()
        net = peft.unwrap(self.network)
        initial = read_target_parameters(files["initial"])
        check_file_identity(initial, net, files["initial"], "initial target parameters")
        source, eval_source = self.pretext_sources(plan)
        eval_batches = fixed_set(eval_source, int(self.recipe.pretext_eval_samples), plan.schedule.batch_size)
        return target_check(plan.pretext, self.network, source, eval_batches, plan.schedule, plan.cfg, self.device,
                            initial["target_parameters"], files["state"], files["control_state"], files["check"],
                            log=lambda m: self.print_to_log_file(m, also_print_to_console=True),
                            settings=self._stage_settings_extra(plan), workers=plan.workers,
                            compile=self._do_i_compile(), **self._embedding_kwargs(plan))

    def pretext_embedding(self, plan: PretextPlan):
        """DINO's embedding of this network (:func:`nnunet_tpp.pretext.stage.network_embedding`): pooled encoder
        stages of a CNN U-Net, the mean patch token of Primus (views resized to its patch)."""
        return network_embedding(peft.unwrap(self.network), plan.schedule.feature_stages, plan.view)

    def _embedding_kwargs(self, plan: PretextPlan) -> dict:
        """``{"embedding": ...}`` for DINO on a token network (Primus), else nothing (the stage's default)."""
        if plan.pretext != "dino" or token_sites(peft.unwrap(self.network)) is None:
            return {}
        return {"embedding": self.pretext_embedding(plan)}

    def _keep_initial(self, path: str, state_file: str) -> None:
        """Writes the target parameters as they are before the stage (their initialisation) to ``path``, once; a
        resumed stage checks the file against the network instead (and refuses a state without it)."""
        net = peft.unwrap(self.network)
        if os.path.isfile(path):
            check_file_identity(read_target_parameters(path), net, path, "initial target parameters")
            return
        if os.path.isfile(state_file):
            raise TPPFoldError(f"{state_file} has no {path} beside it (the target parameters it started from); "
                               f"remove {state_file} to start the pretext stage afresh")
        if is_main():
            save_target_parameters(net, path, {"trainer_name": type(self).__name__, "fold": self.fold,
                                               "initial": True})
        barrier()

    @staticmethod
    def _stage_settings_extra(plan: PretextPlan) -> dict:
        return {**_view_settings(plan.pretext, plan.view, plan.divisor), "cases": sorted(plan.stage_keys)}

    def check_resumable_state(self, state_file: str) -> None:
        """Checks the pretext settings (:meth:`pretext_setup`) and refuses a pretext state that this run could not
        resume (other identity or settings), before the stage starts."""
        plan = self.pretext_setup()
        if os.path.isfile(state_file):
            name = "dino" if plan.pretext == "dino" else "masked"
            check_state(read_state(state_file), peft.unwrap(self.network), state_file,
                        stage_settings(plan.schedule, plan.cfg, {**self._stage_settings_extra(plan),
                                                                 "train_targets": True}, name))


def _view_settings(pretext: str, view, divisor) -> dict:
    if pretext != "dino":
        return {"views": {"size": list(view)}}
    from nnunet_tpp.pretext.crops3d import view_sizes
    g, loc = view_sizes(view, divisor)
    return {"views": {"global": list(g), "local": list(loc)}}


def _listed(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
