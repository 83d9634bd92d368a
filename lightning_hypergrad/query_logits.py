"""The query logits of a few-shot model's last outer loss, kept for the task metric that follows it (see
:class:`QueryLogits`)."""

from __future__ import annotations

from torch import Tensor
from torch._C._functorch import is_batchedtensor, is_functorch_wrapped_tensor

from lightning_hypergrad.inner_loop import RandomState, cuda_devices, random_state, same_random_state


class QueryLogits:
    """The query logits of the last outer loss, for the task metric that follows it (the query accuracy at ``w_T``):
    one forward pass of the query set less per task, which the peers' MAML loops do not spend either.

    They are recalled only for the same inner parameters (the same storages at the same versions: the estimators
    hand the metric ``w_T``'s tensors or views of them), the same query tensor, the same training mode and no random
    draw in the forward pass that made them (dropout: a fresh forward draws its own); never under ``torch.func``
    transforms or ``torch.compile`` (batched or traced tensors have no storage to compare). The memo holds references
    to the tensors it compares, so that no other tensor can take their storage while it lives.
    """

    def __init__(self) -> None:
        self._last: tuple[tuple, list[Tensor], Tensor] | None = None

    @staticmethod
    def _key(model, x: Tensor) -> tuple | None:
        """What the logits depend on besides the module's own code: the inner parameters, the query tensor and the
        module's buffers (by storage, offset, version, shape, stride, dtype) and the training mode; ``None`` where it
        cannot be told."""
        if not hasattr(model, "params") or not hasattr(model, "inner"):  # not an InnerModel's bound model
            return None
        tensors = [*model.params, x, *model.inner.module.buffers()]  # (a buffer changed in place: computed afresh)
        if any(not isinstance(t, Tensor) or _transformed(t) for t in tensors):
            return None
        parts = [(t.untyped_storage().data_ptr(), t.storage_offset(), t._version, t.shape, t.stride(), t.dtype)
                 for t in tensors]  # fmt: skip
        return (*parts, *(m.training for m in model.inner.modules()))

    def before(self, model, x: Tensor) -> tuple[tuple, RandomState] | None:
        """Before the outer loss's forward pass: its key and the generators' state (``None`` where nothing would be
        remembered). A forward pass that changes a buffer in place changes the key, so its logits are not recalled."""
        self._last = None
        key = self._key(model, x)
        return None if key is None else (key, random_state(cuda_devices([*model.params, x])))

    def remember(self, token: tuple[tuple, RandomState] | None, model, x: Tensor, logits: Tensor) -> None:
        """Keep ``logits`` (``token`` from :meth:`before`), unless the forward pass drew random numbers."""
        if token is None or not same_random_state(token[1], random_state(cuda_devices([*model.params, x]))):
            return
        self._last = (token[0], [t.detach() for t in [*model.params, x]], logits.detach())

    def recall(self, model, x: Tensor) -> Tensor | None:
        """The remembered logits where ``model`` and ``x`` are what they were computed from (once), else ``None``."""
        last, self._last = self._last, None
        if last is None:
            return None
        key = self._key(model, x)
        return last[2] if key is not None and key == last[0] else None


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (vmap's batched or grad's tracking tensor): no storage to compare."""
    return bool(is_functorch_wrapped_tensor(t) or is_batchedtensor(t))
