"""The checkpoint hooks of a :class:`~lightning_hypergrad.BilevelModule`, as a mixin (as Lightning builds
``LightningModule`` from hook mixins): what a checkpoint holds besides the weights, and a clear error where it
holds another model's weights."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_hypergrad.optim import OptimizerState

CHECKPOINT_KEY = "lightning_hypergrad"
"""The key of a checkpoint under which the module keeps its own state."""


LOGGING_STEP = "_batches_that_stepped"
"""Lightning's count of the batches that stepped, the step its loggers log at: private (an attribute of the training
epoch loop and its key in the checkpoint's ``epoch_loop.state_dict``), checked against the installed Lightning by
``tests/test_cli_private_names.py``; no public name sets it."""


class CheckpointHooks:
    """``on_save_checkpoint`` and ``on_load_checkpoint`` of a :class:`~lightning_hypergrad.BilevelModule`.

    Saved under ``checkpoint["lightning_hypergrad"]``: the count of skipped steps, the carried inner parameters and
    optimizer state (online mode), the estimator's own state (e.g. AutoGreedy's discount), the last epoch whose end
    was handled, and the settings of the hypergradient (estimator, inner optimizer, T) as strings. Loading a
    checkpoint written with other such settings warns once and goes on with the module's; a checkpoint of another
    model's weights stops with one line.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.carried_state
        checkpoint[CHECKPOINT_KEY] = {
            "skipped_steps": self.skipped_steps,
            "carried_params": self.carried_params,
            "carried_state": None if state is None else {"step": state.step, "buffers": state.buffers},
            "estimator": self.estimator.state_dict() if hasattr(self.estimator, "state_dict") else None,
            "last_epoch_end": self._last_epoch_end,
            "method": self._method(),
        }

    def _method(self) -> dict[str, Any]:
        """The settings of the hypergradient computation, as strings: what a checkpoint says it was written with."""
        return {
            "estimator": str(self.estimator),
            "inner_optimizer": repr(self.inner_optimizer),
            "inner_steps": str(self.inner_steps),
        }

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The first batch of a fit resumed from a checkpoint (``ckpt_path``) logs at the step the uninterrupted run
        logs it at (:func:`logging_step_at_resume`). A subclass that overrides this hook calls
        ``super().on_train_batch_start(batch, batch_idx)``."""
        step = self.__dict__.pop("_logging_step_at_resume", None)
        if step is not None and self._trainer is not None and self.trainer.ckpt_path is not None:
            setattr(self.trainer.fit_loop.epoch_loop, LOGGING_STEP, step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_weights(checkpoint.get("state_dict"))
        self.__dict__["_logging_step_at_resume"] = logging_step_at_resume(checkpoint)
        settle_finished_epoch(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        written, ours = saved.get("method") or {}, self._method()
        changed = [f"{k}: {ours[k]} (checkpoint: {v})" for k, v in written.items() if k in ours and ours[k] != v]
        if changed:
            rank_zero_warn(
                f"the checkpoint was written with other settings of the hypergradient than this module's: "
                f"{'; '.join(changed)}; the run goes on with this module's",
                category=UserWarning,
            )
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.carried_params = saved.get("carried_params")
        state = saved.get("carried_state")
        self.carried_state = None if state is None else OptimizerState(state["step"], state["buffers"])
        self._last_epoch_end = saved.get("last_epoch_end")
        if saved.get("estimator") is not None and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(saved["estimator"])  # e.g. AutoGreedy's fitted discount

    def _check_weights(self, state_dict: dict[str, Tensor] | None) -> None:
        """One line, instead of Lightning's wall of missing keys, where a checkpoint holds another model's weights."""
        if state_dict is None:
            return
        ours = self.state_dict()
        missing = [k for k in ours if k not in state_dict]
        unexpected = [k for k in state_dict if k not in ours]
        reshaped = [
            f"{k} {tuple(state_dict[k].shape)} (this model: {tuple(v.shape)})"
            for k, v in ours.items()
            if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != v.shape
        ]
        if not (missing or unexpected or reshaped):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} of this model's weights are not in it ({', '.join(missing[:3])}...)")
        if unexpected:
            parts.append(
                f"it holds {len(unexpected)} weights this model does not have ({', '.join(unexpected[:3])}...)"
            )
        if reshaped:
            parts.append(f"{len(reshaped)} have other shapes ({'; '.join(reshaped[:2])})")
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        which = f"the checkpoint {path}" if path else "the checkpoint"
        raise ValueError(
            f"{which} was written by another model than {type(self).__name__} with these settings: "
            f"{'; '.join(parts)}; give a checkpoint of this config's model, or the settings it was written with"
        )


def settle_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Makes a checkpoint written after its last epoch had completed resume with the next epoch, as the run would
    have gone on.

    Lightning writes ``last`` at the end of training (``ModelCheckpoint.on_train_end``, when no checkpoint was
    written at the final step: ``every_n_train_steps`` that does not divide ``max_steps``, with ``max_steps`` at an
    epoch's end) and on an exception after the epoch's end, with the epoch completed and its batch counter still at
    the epoch's last batch. A run resumed from it with a larger ``max_steps`` takes that counter for an epoch being
    restarted at its last batch: it runs an epoch without batches, then trains the next one, so every later epoch
    is counted one too far (the tasks of epoch 2 where the uninterrupted run trains on those of epoch 1). The batch
    counter of the epoch is set to the state the next epoch starts from (no batch yet), in the loaded ``checkpoint``
    before Lightning restores its loops from it; a checkpoint of any other point of the run is left as it is.
    """
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = (fit_loop.get("epoch_progress") or {}).get("current") or {}
    batches = fit_loop.get("epoch_loop.batch_progress") or {}
    counts = [epochs.get(key) for key in ("ready", "started", "processed", "completed")]
    if not counts[0] or len(set(counts)) != 1 or not batches.get("is_last_batch"):
        return  # not an epoch completed before the checkpoint was written
    current = batches.get("current") or {}
    batches["current"] = dict.fromkeys(current, 0)
    batches["is_last_batch"] = False


def logging_step_at_resume(checkpoint: dict[str, Any]) -> int | None:
    """The step the first batch of a run resumed from ``checkpoint`` logs at in the uninterrupted run: the number of
    batches begun before the checkpoint (each logs at its own step, a module of this package stepping once per batch,
    with no accumulation); ``None`` for a checkpoint without Lightning's loops.

    Lightning's own count (:data:`LOGGING_STEP`) comes back one too far from a checkpoint written at the end of
    training with the last batch's validation done (``last``): the resumed run's first pass skips that validation and
    counts the pass as a batch, so every later point of the extended run was logged one step later than in the
    uninterrupted run. :meth:`CheckpointHooks.on_train_batch_start` sets the count before the first batch.
    """
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    total = (fit_loop.get("epoch_loop.batch_progress") or {}).get("total") or {}
    return total.get("processed")
