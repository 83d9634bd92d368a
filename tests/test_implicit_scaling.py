"""Self-scaling Neumann, damped IFT solves and their costs, against explicit matrices (float64)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from bilevel_cases import MLPTask, Ridge

import lightning_hypergrad as lh
from lightning_hypergrad.estimators.implicit import power_iteration

PAPER_SCALE = 0.1  # the paper's Neumann scale: its inner learning rate


class Quadratic:
    """A quadratic inner problem with a Hessian built from chosen eigenvalues, and a vector hyperparameter.

    Inner ``0.5 (w - c)^T A (w - c) + 0.5 sum_i exp(a_i) w_i^2`` (Hessian ``A + diag(exp(a))``), outer
    ``0.5 |B w - y|^2 + 0.5 beta |a|^2`` (a direct term in ``a``). Everything is float64.
    """

    def __init__(self, eigenvalues, seed: int = 0, beta: float = 0.3, outer_factor: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        eigenvalues = torch.as_tensor(eigenvalues, dtype=dt)
        self.d = d = len(eigenvalues)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
        self.A = q @ torch.diag(eigenvalues) @ q.T
        self.c = torch.randn(d, generator=g, dtype=dt)
        self.B = torch.randn(d + 3, d, generator=g, dtype=dt)
        self.y = torch.randn(d + 3, generator=g, dtype=dt)
        self.w0 = 0.1 * torch.randn(d, generator=g, dtype=dt)
        self.a = torch.linspace(-2.5, -1.5, d, dtype=dt).requires_grad_()
        self.beta, self.outer_factor = beta, outer_factor

    def inner_loss(self, w, h):
        r = w[0] - self.c
        return 0.5 * r @ self.A @ r + 0.5 * (h[0].exp() * w[0] ** 2).sum()

    def outer_loss(self, w, h):
        return self.outer_factor * (0.5 * ((self.B @ w[0] - self.y) ** 2).sum() + 0.5 * self.beta * (h[0] ** 2).sum())

    def hessian(self) -> torch.Tensor:
        return self.A + torch.diag(self.a.detach().exp())

    def problem(self, steps: int, lr: float) -> lh.BilevelProblem:
        return lh.BilevelProblem(self.inner_loss, self.outer_loss, [self.a], [self.w0], lh.SGD(lr=lr), steps)

    def converged_problem(self) -> lh.BilevelProblem:
        """Gradient descent with the optimal step ``2 / (lambda_min + lambda_max)``, run to machine precision."""
        eig = torch.linalg.eigvalsh(self.hessian())
        return self.problem(400, lr=float(2 / (eig[0] + eig[-1])))

    def implicit_hypergrad(self, w: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``grad_a L_val - (d^2 L_train / d a d w) (H + damping I)^-1 g_T`` at ``w``, by explicit matrices."""
        a = self.a.detach()
        H = self.hessian() + damping * torch.eye(self.d, dtype=torch.float64)
        g_w = self.outer_factor * self.B.T @ (self.B @ w - self.y)
        direct = self.outer_factor * self.beta * a
        mixed = torch.diag(a.exp() * w)  # d/da_j of d L_train / d w_i = delta_ij exp(a_i) w_i
        return direct - mixed @ torch.linalg.solve(H, g_w)


def stiff() -> Quadratic:
    """``lambda_max`` about 40: the paper's scale gives ``0.1 lambda_max`` about 4, beyond the series' bound of 2."""
    return Quadratic(torch.linspace(4.0, 40.0, 6))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# --- the scale ------------------------------------------------------------------------------------------------


def test_self_scaled_neumann_converges_where_the_papers_scale_diverges():
    quad = stiff()
    problem = quad.converged_problem()
    assert PAPER_SCALE * float(torch.linalg.eigvalsh(quad.hessian())[-1]) > 2  # the fixed scale is out of bounds

    auto = lh.Neumann(iterations=400, power_iterations=50)
    result = no_warnings(lambda: auto(problem))
    expected = quad.implicit_hypergrad(result.params[0])
    assert relative_error(result.hypergrads[0], expected) < 1e-9

    errors = []
    for k in (10, 20, 40):
        with pytest.warns(RuntimeWarning, match="series diverges; use scale='auto'"):
            got = lh.Neumann(iterations=k, scale=PAPER_SCALE)(problem).hypergrads[0]
        errors.append(relative_error(got, expected))
    assert errors[0] > 1 and errors[0] < errors[1] < errors[2] and errors[2] > 1e10  # it grows like 3^K


def test_default_neumann_is_self_scaled_and_matches_the_ridge_closed_form():
    ridge = Ridge()
    estimator = lh.Neumann(iterations=300)
    assert estimator.scale == "auto" and str(estimator) == "neumann(300)"
    got = estimator(ridge.problem(3000, lr=0.5)).hypergrads[0]
    expected = ridge.implicit_hypergrad()
    assert abs(float(got) - expected) < 1e-8 * abs(expected)
    H = ridge._hessian()
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert 1 / lam <= estimator.last_stats.scale < 1.1 / lam  # 10 power iterations: lambda_max within 10%


def test_the_scale_is_one_over_the_power_iteration_estimate_and_is_logged():
    quad = stiff()
    estimator = lh.Neumann(iterations=3, power_iterations=4)
    estimator(quad.converged_problem())
    stats = dataclasses.asdict(estimator.last_stats)
    assert set(stats) == {"hvps", "lambda_max", "min_curvature", "scale", "residual"}
    assert stats["hvps"] == 7 and stats["residual"] is None
    # the power-iteration estimate is a lower bound of lambda_max, so the scale is at least 1 / lambda_max
    lam = float(torch.linalg.eigvalsh(quad.hessian())[-1])
    assert 1 / lam <= stats["scale"] < 2 / lam and stats["lambda_max"] <= lam * (1 + 1e-12)
    assert stats["min_curvature"] > 0


def test_scale_lr_is_the_inner_sgd_learning_rate_as_before():
    ridge = Ridge()
    problem = ridge.problem(300, lr=0.5)
    by_lr = lh.Neumann(10, scale="lr")(problem).hypergrads[0]
    by_number = lh.Neumann(10, scale=0.5)(problem).hypergrads[0]
    torch.testing.assert_close(by_lr, by_number, rtol=0, atol=0)
    assert lh.Neumann(10, scale=None).scale == "lr"


def test_scale_lr_needs_sgd_but_auto_works_with_adam():
    ridge = Ridge()
    problem = lh.BilevelProblem(ridge.inner_loss, ridge.outer_loss, [ridge.a], [ridge.w0], lh.Adam(lr=0.05), 2000)
    with pytest.raises(ValueError, match="scale='lr' takes the inner SGD's learning rate.*Adam"):
        lh.Neumann(10, scale="lr").validate(problem)  # refused before any inner step
    got = lh.Neumann(300)(problem).hypergrads[0]
    assert abs(float(got) - ridge.implicit_hypergrad()) < 1e-4 * abs(ridge.implicit_hypergrad())


# --- the power iteration ---------------------------------------------------------------------------------------


def random_symmetric(eigenvalues, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize(
    "eigenvalues",
    [
        [0.1, 0.5, 1.0, 2.0, 3.0, 3.5, 5.0],  # positive definite
        [-7.0, -1.0, 0.5, 2.0, 4.0, 6.0],  # the largest magnitude is a negative eigenvalue
        [-2.0, 0.0, 0.3, 1.0, 9.0],  # indefinite, singular, positive dominant
    ],
)
def test_power_iteration_finds_the_spectral_radius(eigenvalues):
    matrix = random_symmetric(eigenvalues)
    start = torch.randn(len(eigenvalues), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    radius, rayleigh = power_iteration(lambda v: [matrix @ v[0]], [start], 200)
    eig = torch.linalg.eigvalsh(matrix)
    dominant = eig[eig.abs().argmax()]
    assert float(radius) == pytest.approx(float(dominant.abs()), rel=1e-6)
    assert float(rayleigh) == pytest.approx(float(dominant), rel=1e-6)


def test_power_iteration_of_a_zero_start_is_zero():
    radius, rayleigh = power_iteration(lambda v: [3.0 * v[0]], [torch.zeros(4, dtype=torch.float64)], 5)
    assert float(radius) == 0 and float(rayleigh) == 0


def flat_hessian(loss, params):
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def f(x):
        return loss([c.reshape(s) for c, s in zip(torch.split(x, sizes), shapes)])

    return torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]).detach())


@pytest.mark.parametrize("damping", [0.0, 0.25])
def test_the_estimators_lambda_max_matches_eigvalsh(damping):
    # ridge: one parameter tensor, positive definite
    ridge = Ridge()
    estimator = lh.Neumann(iterations=1, power_iterations=300, damping=damping)
    estimator(ridge.problem(200, lr=0.5))
    expected = float(torch.linalg.eigvalsh(ridge._hessian())[-1]) + damping
    assert estimator.last_stats.lambda_max == pytest.approx(expected, rel=1e-6)
    assert estimator.last_stats.scale == pytest.approx(1 / expected, rel=1e-6)

    # a small network: three parameter tensors, the Hessian of the inner loss at w_T built explicitly
    task = MLPTask()
    estimator = lh.Neumann(iterations=1, power_iterations=300, damping=damping)
    result = estimator(task.problem(300, lh.SGD(lr=0.3, momentum=0.9), hyperparameters=[task.log_wd]))
    H = flat_hessian(lambda w: task.inner_loss(w, [task.log_wd.detach()]), result.params)
    expected = float(torch.linalg.eigvalsh(H)[-1]) + damping
    assert estimator.last_stats.lambda_max == pytest.approx(expected, rel=1e-6)


# --- damping and negative curvature ----------------------------------------------------------------------------


def indefinite() -> Quadratic:
    """A Hessian with eigenvalue -1 (a saddle), as a non-convex inner loss away from a minimum can have."""
    return Quadratic([-1.2, 0.8, 2.0, 3.0, 5.0, 9.0], seed=3)


def test_neumann_warns_of_negative_curvature():
    quad = indefinite()
    assert float(torch.linalg.eigvalsh(quad.hessian())[0]) < 0
    with pytest.warns(RuntimeWarning, match="negative curvature.*set damping above"):
        lh.Neumann(iterations=30)(quad.problem(2, lr=0.01))


def test_damped_neumann_solves_the_damped_system_without_warning():
    quad = indefinite()
    problem = quad.problem(2, lr=0.01)  # far from stationary: the formula is evaluated at w_T all the same
    estimator = lh.Neumann(iterations=300, power_iterations=50, damping=2.5)
    result = no_warnings(lambda: estimator(problem))
    expected = quad.implicit_hypergrad(result.params[0], damping=2.5)
    assert relative_error(result.hypergrads[0], expected) < 1e-9
    assert estimator.last_stats.min_curvature > 0


@pytest.mark.parametrize("spec", ["neumann(300, power_iterations=50, damping='1/lr')", "cg(12, damping='1/lr')"])
def test_damping_one_over_lr_solves_the_system_damped_by_the_inner_sgds_rate(spec):
    quad = indefinite()  # eigenvalue -1.2: undamped, both solves fail; damped by 1 / 0.4 = 2.5, H is positive definite
    estimator = lh.get_estimator(spec)
    assert str(estimator) == spec and estimator.damping == "1/lr"
    result = no_warnings(lambda: estimator(quad.problem(2, lr=0.4)))
    expected = quad.implicit_hypergrad(result.params[0], damping=2.5)
    assert relative_error(result.hypergrads[0], expected) < 1e-9


def test_damping_one_over_lr_needs_an_sgd_rate_and_says_so_before_any_work():
    quad = indefinite()
    calls = []

    def inner_loss(w, h):
        calls.append(1)
        return quad.inner_loss(w, h)

    problem = lh.BilevelProblem(inner_loss, quad.outer_loss, [quad.a], [quad.w0], lh.Adam(lr=0.01), 2)
    with pytest.raises(ValueError, match=r"damping='1/lr' takes 1 / the inner SGD's learning rate.*give damping as"):
        lh.Neumann(damping="1/lr")(problem)
    assert not calls  # refused before the inner loop ran
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0 or '1/lr', got 'lr'"):
        lh.get_estimator("cg(10, damping='lr')")


@pytest.mark.parametrize("damping", [0.0, 0.5, 3.0])
def test_conjugate_gradient_with_damping_solves_the_damped_system(damping):
    quad = stiff()
    estimator = lh.ConjugateGradient(iterations=2 * quad.d, damping=damping)
    result = no_warnings(lambda: estimator(quad.converged_problem()))
    expected = quad.implicit_hypergrad(result.params[0], damping=damping)
    assert relative_error(result.hypergrads[0], expected) < 1e-10


def test_conjugate_gradient_with_damping_handles_a_saddle():
    quad = indefinite()
    result = no_warnings(lambda: lh.ConjugateGradient(iterations=20, damping=2.5)(quad.problem(2, lr=0.01)))
    expected = quad.implicit_hypergrad(result.params[0], damping=2.5)
    assert relative_error(result.hypergrads[0], expected) < 1e-10


def test_conjugate_gradient_tol_is_relative_to_g_t():
    runs = []
    for factor in (1.0, 1e6):
        quad = Quadratic(torch.linspace(1.0, 3.0, 30), outer_factor=factor)
        estimator = lh.ConjugateGradient(iterations=50, tol=1e-3)
        estimator(quad.problem(3, lr=0.01))
        runs.append(estimator.last_stats)
    assert runs[0].hvps == runs[1].hvps < 15  # stopped early, at the same step whatever the outer loss's scale
    assert runs[0].residual <= 1e-3 and runs[1].residual == pytest.approx(runs[0].residual, rel=1e-6)


# --- cost ------------------------------------------------------------------------------------------------------


def count_autograd_calls(monkeypatch, estimator, problem) -> int:
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return grad(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", counting)
        estimator(problem, check=False)
    return len(calls)


def test_cost_is_power_iterations_plus_series_terms_plus_one(monkeypatch):
    problem = stiff().converged_problem()
    reference = lh.Neumann(iterations=1, scale=0.01)
    base = count_autograd_calls(monkeypatch, reference, problem)
    for estimator, hvps, jvps in [
        (lh.Neumann(iterations=7, power_iterations=5), 12, 13),
        (lh.Neumann(iterations=10), 20, 21),
        (lh.Neumann(iterations=10, scale=0.01), 10, 11),
        (lh.Neumann(iterations=10, scale=0.01, power_iterations=99), 10, 11),  # no power iteration with a number
    ]:
        assert count_autograd_calls(monkeypatch, estimator, problem) - base == hvps - 1
        assert estimator.last_stats.hvps == hvps and estimator.jvps == jvps
    assert lh.ConjugateGradient(iterations=10).jvps == 11


# --- spec strings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, alias",
    [
        ("neumann(10, scale='auto')", "neumann(10)"),
        ("neumann(10, scale=None)", "neumann(10, scale='lr')"),
        ("neumann(10, scale=1)", "neumann(10, scale=1.0)"),
        ("cg(10, damping=0)", "cg(10)"),
    ],
)
def test_equivalent_specs_print_one_canonical_form(spec, alias):
    assert str(lh.get_estimator(spec)) == alias


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lh.Neumann(scale="bogus"), "scale must be 'auto', 'lr' or a number > 0"),
        (lambda: lh.Neumann(scale=0.0), "scale must be a number > 0"),
        (lambda: lh.Neumann(scale=float("inf")), "scale must be a number > 0"),
        (lambda: lh.Neumann(power_iterations=0), "power_iterations must be an integer >= 1"),
        (lambda: lh.Neumann(damping=-0.1), "damping must be a finite number >= 0"),
        (lambda: lh.ConjugateGradient(damping=float("nan")), "damping must be a finite number >= 0"),
        (lambda: lh.ConjugateGradient(tol=-1.0), "tol must be a finite number >= 0"),
    ],
)
def test_bad_options_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_stats_are_reset_and_absent_before_a_call():
    estimator = lh.ConjugateGradient(5)
    assert estimator.last_stats is None
    estimator(stiff().converged_problem())
    assert estimator.last_stats.scale is None and estimator.last_stats.hvps <= 5
