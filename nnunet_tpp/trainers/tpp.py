"""TPP trainers: target parameter pre-training (DINO on the fold's own training images, backbone frozen,
only the PEFT method's new parameters train), then the usual supervised PEFT fine-tuning from exactly
those parameters. One class serves every method that adds parameters (``TPPConvAdapterTrainer``,
``TPPLoRATrainer``, ...).

In the fold folder: ``tpp_target_parameters.pth`` (the stage's result; a finished stage is never
repeated), ``tpp_state.pth`` (resumable state while it runs), ``tpp_progress.png`` (loss per epoch) and
``tpp_backbone.txt`` (the ``-pretrained_weights`` file, reloaded when ``--c`` resumes a pretext stage).
"""
from __future__ import annotations

import os

import numpy as np

from nnunet_tpp import peft
from nnunet_tpp.pretext.crops3d import MultiCropSampler
from nnunet_tpp.pretext.dino import DINOConfig
from nnunet_tpp.pretext.stage import PretextSchedule, load_target_parameters, run_dino_stage, \
    save_target_parameters
from nnunet_tpp.trainers.base import ENV_TARGET_PARAMETERS, STUNetPeftTrainer

TPP_FILE = "tpp_target_parameters.pth"
TPP_STATE = "tpp_state.pth"
TPP_PLOT = "tpp_progress.png"
TPP_BACKBONE = "tpp_backbone.txt"


class STUNetTPPTrainer(STUNetPeftTrainer):
    """A PEFT trainer whose supervised stage starts from pretext-trained target parameters."""

    def load_pretrained_backbone(self, path: str) -> None:
        super().load_pretrained_backbone(path)
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, TPP_BACKBONE), "w") as f:
                f.write(os.path.abspath(path))

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:  # a resumed supervised stage has its parameters from its checkpoint
            self.prepare_target_parameters()

    def prepare_target_parameters(self) -> None:
        """Loads the target parameters fine-tuning starts from: the fold's finished pretext result, or a
        pretext stage run (or resumed) now. A file given with ``NNUNET_TPP_TARGET_PARAMETERS`` replaces both
        (loaded by the base class, as for every PEFT trainer)."""
        net = peft.unwrap(self.network)
        if os.environ.get(ENV_TARGET_PARAMETERS):
            return  # loaded by STUNetPeftTrainer.on_train_start; no pretext stage here
        result = os.path.join(self.output_folder, TPP_FILE)
        self._reload_backbone_if_resuming()
        if os.path.isfile(result):
            self.print_to_log_file(f"TPP: pretext stage already finished ({result}); not repeated",
                                   also_print_to_console=True)
        elif self.local_rank == 0:  # with DDP one process runs the stage, the others wait for its result
            self.run_pretext_stage(result)
        if self.is_ddp:
            import torch.distributed as dist
            dist.barrier()
        load_target_parameters(net, result)
        self.print_to_log_file(f"TPP: supervised fine-tuning starts from the pre-trained target parameters "
                               f"in {result}", also_print_to_console=True)

    def _reload_backbone_if_resuming(self) -> None:
        record = os.path.join(self.output_folder, TPP_BACKBONE)
        if self.pretrained_report is None and os.path.isfile(record):
            with open(record) as f:
                path = f.read().strip()
            self.print_to_log_file(f"TPP: resuming; reloading the pre-trained backbone {path}",
                                   also_print_to_console=True)
            self.load_pretrained_backbone(path)

    def run_pretext_stage(self, result_file: str) -> None:
        """DINO on the fold's training cases (never its validation cases); writes ``result_file``."""
        train_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, train_keys)
        pools = np.prod(np.array(peft.unwrap(self.network).pool_op_kernel_sizes), axis=0)
        sampler = MultiCropSampler(dataset, train_keys, self.configuration_manager.patch_size, pools,
                                   seed=12345 + (0 if self.fold == "all" else int(self.fold)))
        schedule = PretextSchedule(epochs=int(self.recipe.pretext_epochs),
                                   iterations_per_epoch=int(self.recipe.pretext_iterations_per_epoch),
                                   batch_size=self.batch_size,
                                   feature_stages=tuple(self.recipe.pretext_feature_stages))
        self.print_to_log_file(
            f"TPP: DINO pretext stage on {len(train_keys)} training cases: {schedule.epochs} epochs x "
            f"{schedule.iterations_per_epoch} iterations, batch {schedule.batch_size}, views "
            f"{sampler.cfg.n_global} x {sampler.global_size} + {sampler.cfg.n_local} x {sampler.local_size}; "
            f"training {sum(p.numel() for p in peft.target_parameters(self.network).values())} target "
            f"parameters (+ DINO head), backbone frozen", also_print_to_console=True)
        run_dino_stage(self.network, sampler.sample, schedule, DINOConfig(), self.device,
                       os.path.join(self.output_folder, TPP_STATE),
                       log=lambda m: self.print_to_log_file(m, also_print_to_console=True),
                       plot_file=os.path.join(self.output_folder, TPP_PLOT))
        save_target_parameters(self.network, result_file, {"trainer_name": type(self).__name__,
                                                           "fold": self.fold})
        self.print_to_log_file(f"TPP: pretext stage finished; target parameters saved to {result_file}",
                               also_print_to_console=True)
