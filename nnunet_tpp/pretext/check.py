"""The target check: does a pretext stage put what it learns into the target parameters, or could its head alone
have learned it? Written by the stage itself (``pretext_control: true``) as ``tpp_target_check.json``.

After the full stage (target parameters and head train) the same stage is run again from the same initial target
parameters with those *frozen*: only the head (DINO's projection head, or the masked reconstruction's output layer,
with its mask token on Primus) trains, with the same steps, learning rates and views (the *head-only control*). Then one fixed evaluation set --
views (and masks) of training cases the stages did not draw -- gives three losses:

* ``loss_trained``: the full stage's network and head (its result);
* ``loss_reset``: the same head, the target parameters reset to their initialisation;
* ``loss_control``: the control's head on the initial target parameters.

``loss_reset`` above ``loss_trained`` says the head relies on what the target parameters learned; ``loss_control``
above ``loss_trained`` says a head alone, trained as long, does not reach the full stage. ``relative_change`` is how
far the target parameters moved (``||after - before|| / ||before||``); ``control_steps`` the control's steps.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nnunet_tpp import peft
from nnunet_tpp.pretext.distributed import is_main
from nnunet_tpp.pretext.plots import write_json
from nnunet_tpp.pretext.targets import PretextSchedule, copy_target_parameters, read_state, relative_change

CHECK_FILE = "tpp_target_check.json"
PRETEXTS = ("dino", "mae")


def evaluate(pretext: str, network: nn.Module, state: dict, cfg, schedule: PretextSchedule, batches: list,
             device: torch.device, embedding: nn.Module | None = None) -> float:
    """The pretext loss of the fixed ``batches`` for the network's present target parameters and the head of
    ``state`` (:func:`~nnunet_tpp.pretext.stage.dino_eval_loss` or
    :func:`~nnunet_tpp.pretext.masked.masked_eval_loss`)."""
    if pretext == "dino":
        from nnunet_tpp.pretext.stage import dino_eval_loss
        return dino_eval_loss(network, state, cfg, schedule, batches, device, embedding)
    from nnunet_tpp.pretext.masked import masked_eval_loss
    return masked_eval_loss(network, state, batches, device, cfg)


def run_stage(pretext: str, network: nn.Module, source, schedule: PretextSchedule, cfg, device: torch.device,
              state_file: str, **kwargs) -> list[float]:
    """Runs the DINO or masked-reconstruction stage (``kwargs``: those of ``run_dino_stage`` /
    ``run_masked_stage``)."""
    if pretext == "dino":
        from nnunet_tpp.pretext.stage import run_dino_stage
        return run_dino_stage(network, source, schedule, cfg, device, state_file, **kwargs)
    from nnunet_tpp.pretext.masked import run_masked_stage
    kwargs.pop("embedding", None)
    return run_masked_stage(network, source, schedule, cfg, device, state_file, **kwargs)


def target_check(pretext: str, network: nn.Module, source, eval_batches: list, schedule: PretextSchedule, cfg,
                 device: torch.device, initial: dict[str, torch.Tensor], state_file: str, control_state_file: str,
                 check_file: str | None = None, log: Callable[[str], None] = print, **stage_kwargs) -> dict:
    """Runs the head-only control (resumable from ``control_state_file``) and evaluates the three losses.

    Args:
        pretext: ``dino`` or ``mae``.
        network: holds the full stage's result (its target parameters after the stage); left so on return.
        source: the stage's view source (the control draws the same views).
        eval_batches: the fixed evaluation set (views of cases the stage did not draw).
        schedule, cfg: the stage's schedule and recipe.
        initial: the target parameters before the stage (their initialisation).
        state_file: the full stage's state (its head); control_state_file: the control's.
        check_file: where to write the result (``tpp_target_check.json``; rank 0 only).
        stage_kwargs: passed to the control's stage (``workers``, ``settings``, ``embedding``, ``compile``).
    Returns:
        ``{"pretext", "loss_trained", "loss_reset", "loss_control", "control_steps", "relative_change", ...}``.
    """
    if pretext not in PRETEXTS:
        raise ValueError(f"pretext must be one of {', '.join(PRETEXTS)}, got {pretext!r}")
    net = peft.unwrap(network)
    result = {n: p.detach().clone() for n, p in peft.target_parameters(net).items()}
    embedding = stage_kwargs.get("embedding")
    full = read_state(state_file, device)
    loss_trained = evaluate(pretext, net, full, cfg, schedule, eval_batches, device, embedding)
    try:
        copy_target_parameters(net, initial, "the initial target parameters")
        loss_reset = evaluate(pretext, net, full, cfg, schedule, eval_batches, device, embedding)
        if is_main():
            log(f"TPP target check: head-only control, the same stage with the target parameters frozen at their "
                f"initialisation ({schedule.epochs * schedule.iterations_per_epoch} steps)")
        run_stage(pretext, net, source, schedule, cfg, device, control_state_file, log=log, train_targets=False,
                  **stage_kwargs)
        loss_control = evaluate(pretext, net, read_state(control_state_file, device), cfg, schedule, eval_batches,
                                device, embedding)
    finally:
        copy_target_parameters(net, result, "the stage's result")
    check = {"pretext": pretext, "loss_trained": loss_trained, "loss_reset": loss_reset,
             "loss_control": loss_control, "control_steps": schedule.epochs * schedule.iterations_per_epoch,
             "relative_change": relative_change(initial, result),
             "reset_over_trained": loss_reset / loss_trained if loss_trained else float("inf"),
             "control_over_trained": loss_control / loss_trained if loss_trained else float("inf"),
             "eval_samples": sum(_batch_size(b) for b in eval_batches),
             "stage_steps": schedule.epochs * schedule.iterations_per_epoch}
    if check_file and is_main():
        write_json(check, check_file)
    if is_main():
        log(f"TPP target check ({pretext}): loss on the held-out evaluation views: trained {loss_trained:.4f}, "
            f"target parameters reset {loss_reset:.4f} ({check['reset_over_trained']:.3f}x), head-only control "
            f"{loss_control:.4f} ({check['control_over_trained']:.3f}x); target parameters moved by "
            f"{check['relative_change']:.3g} of their norm" + (f"; written to {check_file}" if check_file else ""))
    return check


def _batch_size(batch) -> int:
    first = batch[0]
    return int(first[0].shape[0]) if isinstance(first, (list, tuple)) else int(first.shape[0])
