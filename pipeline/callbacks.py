"""The Trainer callbacks every stage trains with (`standard_callbacks`), and the loss before training."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.checkpoint import last_trainer_checkpoint
from pipeline.errors import PipelineError


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first non-finite loss or weights, before a bad trainer checkpoint can be written.

    A NaN/inf gradient turns every weight NaN at the optimizer step (clipping spreads it), so one trained
    tensor shows it. It is checked on the steps the Trainer is about to log or save, ahead of the save (not
    on every step: a device sync on the hot path). The logged loss is checked too.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (control.should_save or control.should_log):  # set by the Trainer's flow callback, run before
            return
        weight = next(p for p in model.parameters() if p.requires_grad).detach()
        weight = weight.to_local() if hasattr(weight, "to_local") else weight  # a sharded (FSDP) parameter
        if weight.numel() and not torch.isfinite(weight).all():
            self._stop("the weights became non-finite", state.global_step, args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(f"the training loss became {loss}", state.global_step, args)

    @staticmethod
    def _stop(what: str, step: int, args) -> None:
        kept = last_trainer_checkpoint(Path(args.output_dir))
        raise PipelineError(f"{what} at step {step}; lower trainer.learning_rate or check the data. "
                            + (f"The last good trainer checkpoint is kept: {kept}" if kept else
                               "No trainer checkpoint was written before it."))


class StepTimer(TrainerCallback):
    """Steady-state seconds per optimizer step, everything the Trainer does in a step included; the first
    `skip` steps (warm-up: allocations, first-call overheads) are left out."""

    def __init__(self, skip: int = 5):
        self.skip = skip
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        first = min(self.skip, max(len(self.ends) - 2, 0))
        return (self.ends[-1] - self.ends[first]) / max(len(self.ends) - 1 - first, 1)


def standard_callbacks(run, timer_skip: int = 5) -> list[TrainerCallback]:
    """What every stage's Trainer gets: the stop at a non-finite loss, the step timer (kept as run.timer, whose
    steady_seconds_per_step the run records), and the callbacks its caller added (run.callbacks). timer_skip:
    warm-up steps the timer leaves out (one for the online methods, whose steps are long)."""
    run.timer = StepTimer(skip=timer_skip)
    return [StopOnNonFiniteLoss(), run.timer, *run.callbacks]


class InitialEvalLoss(TrainerCallback):
    """The eval loss before training, measured by the trainer's own evaluation at the start of training
    (`eval_on_start`: after the model is prepared, which FSDP2 and DeepSpeed need before any forward) and kept in
    the entry, so that a resumed run reports it too. Pass `eval_on_start=not InitialEvalLoss.recorded(run)`."""

    def __init__(self, run):
        self.run = run

    @staticmethod
    def recorded(run) -> bool:
        return "initial_eval_loss" in run.entry.metrics

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.recorded(self.run):
            self.run.record(initial_eval_loss=metrics["eval_loss"])
            self.run.log(f"Eval loss before training: {metrics['eval_loss']:.4f}")
