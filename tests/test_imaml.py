"""Implicit MAML (a learned initialization with a proximal term) and the solvers for indefinite systems (CG on the
normal equations, MINRES), against closed forms and explicit linear algebra."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning_cases import loader, quiet_trainer, random_meta_batch
from torch import nn

import lightning_hypergrad as lh

LAMBDA = 2.0


class _Vector(nn.Module):
    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(values.clone())


def _quadratic_system(n: int = 6, seed: int = 0):
    """``A`` symmetric with a negative eigenvalue above ``-LAMBDA`` (so ``A + LAMBDA I`` is positive definite)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([3.0, 1.5, 0.8, 0.2, -0.3, -0.9], dtype=torch.float64)[:n]
    a = q @ torch.diag(eigenvalues) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    phi = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b, c, phi


class _QuadraticIMAML(lh.BilevelModule):
    """``L_train(w) = w A w / 2 - b w``, ``L_val(w) = |w - c|^2 / 2``; ``phi`` learned with iMAML's proximal term."""

    def __init__(self, estimator: str, proximal: float | None = LAMBDA, steps: int = 300) -> None:
        super().__init__(estimator=estimator, inner_optimizer=lh.SGD(lr=0.15), inner_steps=steps)
        self.a, self.b, self.c, phi = _quadratic_system()
        self.inner_model = lh.InnerModel(_Vector(phi), init="learned", proximal=proximal)

    def inner_loss(self, model, h, task):
        w = model["w"]
        return 0.5 * w @ self.a @ w - self.b @ w

    def outer_loss(self, model, h, task):
        return 0.5 * ((model["w"] - self.c) ** 2).sum()


def closed_form(proximal: float = LAMBDA) -> torch.Tensor:
    """``d L_val(w*(phi)) / d phi = (I + A / lambda)^-1 (w* - c)`` with ``w* = (A + lambda I)^-1 (b + lambda phi)``."""
    a, b, c, phi = _quadratic_system()
    eye = torch.eye(len(b), dtype=torch.float64)
    w_star = torch.linalg.solve(a + proximal * eye, b + proximal * phi)
    return torch.linalg.solve(eye + a / proximal, w_star - c)


@pytest.mark.parametrize("spec", ["cg(6)", "cg(12, normal=True)", "minres(6)", "neumann(200, scale=0.2)"])
def test_each_implicit_solver_gives_imamls_closed_form_hypergradient(spec):
    model = _QuadraticIMAML(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no solver warning: H + lambda I is positive definite here
        got = model.meta_gradient([None]).hypergrads[0]
    want = closed_form()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, closed_form(2 * LAMBDA), rtol=1e-3)  # the comparison sees lambda


def test_exact_rmd_through_the_converged_loop_equals_the_implicit_hypergradient():
    got = _QuadraticIMAML("rmd").meta_gradient([None]).hypergrads[0]
    assert torch.allclose(got, closed_form(), rtol=1e-9, atol=1e-12)
    short = _QuadraticIMAML("rmd", steps=3).meta_gradient([None]).hypergrads[0]  # not converged: not equal
    assert not torch.allclose(short, closed_form(), rtol=1e-3)


def test_fo_takes_the_outer_gradient_itself():
    model = _QuadraticIMAML("fo")
    got = model.meta_gradient([None]).hypergrads[0]
    a, b, c, phi = _quadratic_system()
    w_star = torch.linalg.solve(a + LAMBDA * torch.eye(6, dtype=torch.float64), b + LAMBDA * phi)
    # FO differentiates L_val(w_T) directly; phi reaches it only through w_T, which FO holds constant: zero
    assert torch.allclose(got, torch.zeros_like(got)) and (w_star - c).abs().max() > 0.1


def test_a_learned_initialization_without_the_proximal_term_is_still_refused_by_the_implicit_estimators():
    model = _QuadraticIMAML("cg(5)", proximal=None)
    with pytest.raises(ValueError, match="cannot differentiate a learned initialization"):
        model.check_inner_model()
    _QuadraticIMAML("cg(5)").check_inner_model()  # with it: accepted


def test_the_proximal_term_needs_a_learned_initialization_and_a_positive_strength():
    with pytest.raises(ValueError, match="set init='learned'"):
        lh.InnerModel(nn.Linear(2, 1), init="fixed", proximal=1.0)
    with pytest.raises(ValueError, match="must be a number > 0"):
        lh.InnerModel(nn.Linear(2, 1), init="learned", proximal=0.0)


def _indefinite(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([4.0, 2.0, 1.0, 0.5, -0.2, -0.7, -1.5, -3.0], dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    return a, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("estimator", [lh.MINRES(8), lh.ConjugateGradient(60, normal=True)])
def test_minres_and_normal_cg_solve_an_indefinite_system_where_plain_cg_stops(estimator):
    a, b = _indefinite()
    truth = torch.linalg.solve(a, b)
    x = estimator.solve(lambda v: [a @ v[0]], [b], None)[0]
    assert torch.allclose(x, truth, rtol=1e-9, atol=1e-11)
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        stopped = lh.ConjugateGradient(8).solve(lambda v: [a @ v[0]], [b], None)[0]
    assert float(torch.linalg.vector_norm(stopped - truth)) > 0.1 * float(torch.linalg.vector_norm(truth))


def test_the_solvers_report_the_residual_of_the_original_system():
    from lightning_hypergrad.estimators.implicit import _Monitor

    a, b = _indefinite()
    for estimator in (lh.MINRES(3), lh.ConjugateGradient(3, normal=True)):
        x = estimator.solve(_Monitor(lambda v: [a @ v[0]]), [b], None)[0]
        residual = float(torch.linalg.vector_norm(b - a @ x) / torch.linalg.vector_norm(b))
        assert estimator.last_stats.residual == pytest.approx(residual, rel=1e-8), type(estimator).__name__
        assert 0 < residual < 1


def test_imaml_trains_through_lightning_with_its_default_solver():
    torch.manual_seed(0)
    model = lh.IMAML(ways=3, image_shape=(1, 8, 8), inner_steps=2, proximal=1.0)
    assert str(model.estimator) == "cg(5, normal=True)" and model.inner_model.proximal == 1.0
    before = [p.detach().clone() for p in model.parameters()]
    quiet_trainer(max_steps=2).fit(model, loader(random_meta_batch(seed=0), random_meta_batch(seed=1)))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_t1t2_on_the_proximal_problem_is_its_one_step_term_lr_lambda_g_t():
    # B_T = d Phi / d phi = -lr d(grad_w)/d phi = lr lambda I (the proximal term's mixed derivative is -lambda I)
    model = _QuadraticIMAML("t1t2", steps=4)
    got = model.meta_gradient([None]).hypergrads[0]
    a, b, c, phi = _quadratic_system()
    w = phi.clone()
    for _ in range(4):  # the inner loop by hand, from phi
        w = w - 0.15 * (a @ w - b + LAMBDA * (w - phi))
    assert torch.allclose(got, 0.15 * LAMBDA * (w - c), rtol=1e-12, atol=1e-14)


class _Logged(L.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("hypergrad/solver")})


def test_the_callback_logs_the_solvers_residual_and_products():
    torch.manual_seed(0)
    model = lh.IMAML(ways=3, image_shape=(1, 8, 8), inner_steps=2, proximal=1.0, estimator="minres(3)")
    logged = _Logged()
    trainer = quiet_trainer(max_steps=2, callbacks=[lh.HypergradCallback(every_n_steps=100), logged])
    trainer.fit(model, loader(random_meta_batch(seed=0), random_meta_batch(seed=1)))
    assert len(logged.seen) == 2 and all(
        set(s) == {"hypergrad/solver_residual", "hypergrad/solver_hvps"} for s in logged.seen
    )
    assert all(0 <= s["hypergrad/solver_residual"] < 1 and s["hypergrad/solver_hvps"] <= 3 for s in logged.seen)
