"""The linear algebra the estimators share: vectors as lists of tensors, products and power iteration."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Vector = list[Tensor]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def power_iteration(hvp: Callable[[Vector], Vector], start: Sequence[Tensor], iterations: int) -> tuple[Tensor, Tensor]:
    """Estimate the largest eigenvalue magnitude of the symmetric operator ``hvp`` with ``iterations`` products.

    Starts from ``start`` (normalized) and multiplies ``iterations`` times, normalizing after each product.

    Returns:
        ``(radius, rayleigh)``: ``radius = |H v|`` for the last unit iterate ``v``, a lower bound of the spectral
        radius of ``H`` that converges to it (the relative error falls like ``(|lambda_2| / |lambda_1|)^(2k)``);
        ``rayleigh = v . H v``, the signed estimate of that eigenvalue (negative: the eigenvalue of largest
        magnitude is negative). Both are 0-dim tensors; ``radius`` is 0 where ``start`` is 0 or lies in the
        null space of ``H``.
    """
    tiny = torch.finfo(start[0].dtype).tiny
    norm = dot(start, start).sqrt().clamp_min(tiny)
    v = [x / norm for x in start]
    radius = rayleigh = torch.zeros((), dtype=start[0].dtype, device=start[0].device)
    for _ in range(iterations):
        hv = hvp(v)
        radius = dot(hv, hv).sqrt()
        rayleigh = dot(v, hv)
        v = [x / radius.clamp_min(tiny) for x in hv]
    return radius, rayleigh


def negative_curvature_tolerance(dtype: torch.dtype) -> float:
    """The relative curvature (to ``lambda_max``) below which a negative Rayleigh quotient is taken as real.

    ``sqrt(eps)``: rounding in Hessian-vector products stays well below it, and a negative eigenvalue smaller
    than ``sqrt(eps) lambda_max`` grows a Neumann series by at most ``(1 + sqrt(eps))^K``, harmless for any
    practical K.
    """
    return math.sqrt(torch.finfo(dtype).eps)


def jvp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], tangents: Sequence[Sequence[Tensor]]
) -> list[list[Tensor]]:
    """Jacobian-vector products of ``outputs`` (with their graph) for each list of input ``tangents``.

    Uses the double-backward identity ``J v = d/du <J^T u, v>``: one reverse pass with a graph, then one more
    reverse pass per tangent.
    """
    keep = [i for i, o in enumerate(outputs) if o.requires_grad]
    u = [torch.zeros_like(outputs[i]).requires_grad_() for i in keep]
    vjp = torch.autograd.grad([outputs[i] for i in keep], inputs, u, create_graph=True, allow_unused=True)
    used = [k for k, g in enumerate(vjp) if g is not None and g.requires_grad]
    results = []
    for tangent in tangents:
        out = [torch.zeros_like(o) for o in outputs]
        if used:
            parts = torch.autograd.grad(
                [vjp[k] for k in used], u, [tangent[k] for k in used], retain_graph=True, allow_unused=True
            )
            for i, part in zip(keep, parts):
                if part is not None:
                    out[i] = part
        results.append(out)
    return results
