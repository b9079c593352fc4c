"""The training core's defaults: step budgets, the linear start, early stopping,
threads and progress reports."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_moons
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from skmapa import IWAEDensity, MAPADensity, VAEDensity
from skmapa._base import (
    AUTO_MAX_STEPS,
    WINDOW_STEPS,
    TrainingStage,
    clip_grad_norm,
    clip_grad_norm_per_model,
)
from skmapa._linear import probabilistic_pca, regression_start
from skmapa._networks import GaussianDecoder, StackedDecoders, build
from skmapa._utils import FLOPS_PER_THREAD, resolve_n_threads, torch_threads

TINY = dict(hidden_layer_sizes=(8,), random_state=0)


def _table(n=300, D=5, d=2, seed=0):
    """Rows of a linear-Gaussian model with unequal feature scales."""
    rng = np.random.RandomState(seed)
    W = rng.normal(size=(D, d)) * 2
    X = rng.normal(size=(n, d)) @ W.T + 0.3 * rng.normal(size=(n, D))
    return X * np.arange(1, D + 1) + 10


# ----------------------------------------------------------------------
# the linear special case
# ----------------------------------------------------------------------
def _ml_ppca_scores(X_fit, X, d):
    """scikit-learn's probabilistic PCA, made maximum-likelihood (its
    covariance divides by n - 1, the maximum-likelihood one by n)."""
    n, mean = len(X_fit), X_fit.mean(0)
    return PCA(d).fit(mean + (X_fit - mean) * np.sqrt((n - 1) / n)).score_samples(X)


def _standardized_ppca(est, X_fit, X, d):
    """PPCA in the estimator's standardized units, reported in X's units."""
    Xs_fit = (X_fit - est.mean_) / est.scale_
    return _ml_ppca_scores(Xs_fit, (X - est.mean_) / est.scale_, d) - np.log(est.scale_).sum()


def _ppca_log_density(start, X):
    cov = start.weight @ start.weight.T + np.diag(start.noise_var)
    from scipy.stats import multivariate_normal

    return multivariate_normal(start.mean, cov).logpdf(X)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_probabilistic_pca_is_sklearns_maximum_likelihood(d):
    X = _table(D=5)
    start = probabilistic_pca(X, np.ones(len(X)), d)
    np.testing.assert_allclose(_ppca_log_density(start, X), _ml_ppca_scores(X, X, d),
                               rtol=1e-9, atol=1e-9)


def test_probabilistic_pca_posterior_is_the_closed_form():
    """Tipping & Bishop: mean M^-1 W^T (x - mu), covariance sigma^2 M^-1."""
    X = _table()
    s = probabilistic_pca(X, np.ones(len(X)), 2)
    A, offset, log_std = s.posterior()
    sigma2 = s.noise_var[0]
    M = s.weight.T @ s.weight + sigma2 * np.eye(2)
    x = X[:7]
    np.testing.assert_allclose(x @ A.T + offset,
                               (x - s.mean) @ (np.linalg.solve(M, s.weight.T)).T, atol=1e-10)
    np.testing.assert_allclose(np.exp(2 * log_std), np.diag(sigma2 * np.linalg.inv(M)),
                               rtol=1e-10)


def test_regression_start_on_principal_codes_recovers_the_linear_fit():
    X = _table()
    Xc = X - X.mean(0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    codes = Xc @ Vt[:2].T
    s = regression_start(codes, X, np.ones(len(X)))
    resid = X - s.mean - codes @ s.weight.T
    np.testing.assert_allclose(resid @ Vt[:2].T, 0, atol=1e-8)  # nothing left along the PCs
    assert s.noise_var[0] == pytest.approx(np.mean(resid**2))


@pytest.mark.parametrize("Estimator", [VAEDensity, IWAEDensity])
def test_pca_start_is_probabilistic_pca_exactly(Estimator):
    """Untrained (max_iter=0), init='pca' scores probabilistic PCA of the
    standardized rows, in X's units: quadrature is exact for one latent
    dimension."""
    X = _table(D=4)
    est = Estimator(n_components=1, init="pca", max_iter=0, early_stopping=False,
                    **TINY).fit(X)
    np.testing.assert_allclose(est.score_samples(X[:50]), _standardized_ppca(est, X, X[:50], 1),
                               rtol=1e-6, atol=1e-6)


def test_linear_start_log_density_is_the_closed_form():
    start = probabilistic_pca(_table(D=5), np.ones(300), 2)
    X = _table(n=40, D=5, seed=1)
    np.testing.assert_allclose(start.log_density(X), _ppca_log_density(start, X),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Estimator, kwargs", [
    (MAPADensity, {}), (VAEDensity, {}), (IWAEDensity, {}),
    (IWAEDensity, dict(encoder="recursive", n_mixture_components=2)),
])
def test_become_linear_scores_probabilistic_pca_exactly(Estimator, kwargs):
    """Whatever was trained, ``_become_linear`` leaves the model equal to the
    linear-Gaussian model it is given: quadrature (one latent dimension)
    gives its closed-form log-density to 1e-8, importance sampling (three)
    within its own error estimate (measured 0.002-0.012 nats, estimates
    0.025-0.030). An amortized encoder, every component of the recursive
    mixture included, is the exact posterior: ``transform`` gives its mean."""
    X = _table(D=5, d=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for d in (1, 3):
            est = Estimator(n_components=d, max_iter=2, early_stopping=False, **kwargs,
                            **TINY).fit(X)
            Xs = (X - est.mean_) / est.scale_
            est._become_linear(probabilistic_pca(Xs, np.ones(len(X)), d))
            est._decoder_changed()
            if Estimator is not MAPADensity:  # the encoder at the exact posterior
                A, offset, _ = probabilistic_pca(Xs, np.ones(len(X)), d).posterior()
                np.testing.assert_allclose(est.transform(X[:30]), Xs[:30] @ A.T + offset,
                                           atol=1e-6)
            log_p, error = est.score_samples(X[:30], return_error=True)
            diff = np.abs(log_p - _standardized_ppca(est, X, X[:30], d))
            if d == 1:
                assert diff.max() < 1e-6
            else:
                assert np.all(diff <= error) and diff.max() < 0.03, (diff, error)


def test_fit_falls_back_to_the_linear_model_where_it_scores_better():
    """Gaussian noise in ten dimensions, 1000 rows: no structure, so MAPA
    holds rows out of both phases; the fitted model scores below
    probabilistic PCA on them and becomes it, fitted to every row (held-out
    nats per row: measured -14.342 / -14.371 / -14.261 before the fallback
    on seeds 0 / 1 / 2, now PCA's -14.231 / -14.256 / -14.109). With rows
    held out by early stopping the VAE and IWAE keep their fit where it is
    better than the linear model (moons), and fall back where it is not."""
    rng = np.random.RandomState(0)
    X = rng.standard_normal((3000, 10))
    train, test = X[:1000], X[1000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MAPADensity(random_state=0).fit(train)
    assert est.validation_scores_ and est.linear_fallback_
    np.testing.assert_allclose(est.score(test), _standardized_ppca(est, train, test, 2).mean(),
                               atol=1e-3)
    assert est.transform(test[:5]).shape == (5, 2)

    moons = make_moons(300, noise=0.05, random_state=0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = VAEDensity(n_components=1, random_state=0).fit(moons)
    assert est.validation_scores_ and not est.linear_fallback_
    assert est.score(moons) > _ml_ppca_scores(moons, moons, 1).mean()


def test_amortized_estimators_judge_structureless_data_on_held_out_rows(monkeypatch):
    """From 1000 rows the VAE and the IWAE do not stop early. On data
    without a low-dimensional structure they still hold rows out: these
    choose the start kept and judge the fallback, but stop nothing. From the
    random start the IWAE fits 1000 rows of Gaussian noise (10-D) and, judged
    on those rows, was kept: 0.37 nats per held-out row below probabilistic
    PCA (measured -14.597 against -14.231 on the rows below). On data with a
    structure (a noisy curve) no row is held out."""
    from skmapa._base import BaseDeepDensity

    held_out = []
    fall_back = BaseDeepDensity._fall_back_to_linear

    def spy(self, data):
        held_out.append(None if data.X_val is None else data.X_val.shape[0])
        return fall_back(self, data)

    monkeypatch.setattr(BaseDeepDensity, "_fall_back_to_linear", spy)
    rng = np.random.RandomState(0)
    X = rng.standard_normal((3000, 10))
    train, test = X[:1000], X[1000:]
    est = IWAEDensity(random_state=0).fit(train)
    assert held_out == [100] and est.n_held_out_ == 100 and est.validation_scores_ is None
    assert not est.early_stopping_ and est.n_iter_ > 1
    ppca = _standardized_ppca(est, train, test, 2).mean()
    assert est.score(test) > ppca - 0.01

    t = rng.uniform(0, 3, 1000)
    curve = np.c_[np.cos(t), np.sin(t), t, t ** 2 / 3] + 0.05 * rng.standard_normal((1000, 4))
    est = VAEDensity(n_components=1, max_iter=2, random_state=0).fit(curve)
    assert held_out[1:] == [None] and est.n_held_out_ == 0


def test_every_minibatch_of_an_epoch_has_about_the_same_size(monkeypatch):
    """Where its last minibatch would be under an eighth of batch_size, an
    epoch of n rows is cut into ceil(n / batch_size) minibatches whose
    sizes differ by at most one row. Cut into full batches and a remainder,
    900 rows gave a last minibatch of 4 rows, one step in eight on a noisy
    gradient: the IWAE on make_classification (50-D) ended 0.2 nats per row
    lower at 1030 rows (a last minibatch of 6 rows) than with even ones.
    Larger remainders, and MAPA's, were measured better as they are
    (``SPREAD_REMAINDER_BELOW``)."""
    sizes = []
    bound = VAEDensity._gaussian_bound

    def spy(self, x, *args):
        sizes.append(x.shape[0])
        return bound(self, x, *args)

    monkeypatch.setattr(VAEDensity, "_gaussian_bound", spy)
    X = np.random.RandomState(0).standard_normal((1000, 3))
    VAEDensity(n_components=1, max_iter=2, batch_size=128, early_stopping=False,
               init="pca", random_state=0).fit(X[:900])
    assert sorted(sizes) == [112] * 8 + [113] * 8
    # a remainder of an eighth of a minibatch or more stays as it is (cut
    # evenly, larger remainders cost the IWAE on macrodata and digits)
    sizes.clear()
    VAEDensity(n_components=1, max_iter=2, batch_size=128, early_stopping=False,
               init="pca", random_state=0).fit(X[:912])
    assert sorted(sizes) == [16] * 2 + [128] * 14


@pytest.mark.parametrize("Estimator", [VAEDensity, IWAEDensity])
def test_fallback_judges_the_start_kept_once(Estimator, monkeypatch):
    """With ``init='auto'`` VAE and IWAE train from two starts and keep the
    better on the held-out rows; only that model meets the linear one. Judged
    after each start instead, a start that fell back was refitted on every
    row, held-out rows included, and then won the choice on those rows."""
    from skmapa._base import BaseDeepDensity

    calls = []
    fall_back = BaseDeepDensity._fall_back_to_linear

    def spy(self, data):
        calls.append(data)
        return fall_back(self, data)

    monkeypatch.setattr(BaseDeepDensity, "_fall_back_to_linear", spy)
    X = make_moons(120, noise=0.1, random_state=0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = Estimator(n_components=1, max_iter=3, **TINY).fit(X)
    assert est.validation_scores_ is not None and set(est.init_scores_) == {"pca", "random"}
    assert len(calls) == 1


def test_pca_start_encoder_is_the_exact_posterior():
    """At the PCA start the encoder is the exact posterior, so every
    importance weight p(x, z) / q(z | x) equals p(x): the IWAE bound is
    log p(x) itself, with no Monte Carlo error, for any number of draws."""
    X = _table(D=4)
    est = IWAEDensity(n_components=2, k=3, init="pca", max_iter=0, early_stopping=False,
                      **TINY).fit(X)
    Xs = est._standardize(X[:20])
    with torch.no_grad():
        bound = est._row_bound(Xs, torch.Generator().manual_seed(0))[1].numpy()
    # (1e-6 nats: the noise scale's softplus parametrisation, round-tripped)
    np.testing.assert_allclose(bound - est._log_det(), _standardized_ppca(est, X, X[:20], 2),
                               rtol=0, atol=1e-5)


def test_mapa_keeps_the_pca_candidate_when_its_bound_is_best():
    """A linear table: the PCA codes beat the spectral ones under the MAPA bound."""
    # seed=2: PCA wins by 0.03 with torch 2.0.0 and 2.13.0 alike; with
    # seed=0 the two tie to 3e-4 and torch 2.0 picks the spectral codes.
    X = _table(n=400, D=5, d=1, seed=2)
    est = MAPADensity(n_components=1, max_iter=3, refine_iter=0, **TINY).fit(X)
    assert set(est.init_scores_) == {"spectral", "angle", "pca"}
    assert min(est.init_scores_, key=est.init_scores_.get) == "pca"


# ----------------------------------------------------------------------
# budgets in steps
# ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [150, 700])
def test_auto_budget_counts_steps_at_every_size(n):
    X = _table(n=n)
    with warnings.catch_warnings():
        # the 'auto' cap is where a stage stops by design: no warning
        warnings.simplefilter("error", ConvergenceWarning)
        est = VAEDensity(n_components=1, init="random", early_stopping=False, tol=0,
                         n_iter_no_change=10**6, **TINY).fit(X)
    batch = min(128, n)
    assert est.n_steps_ == AUTO_MAX_STEPS
    assert len(est.loss_curve_) == AUTO_MAX_STEPS // WINDOW_STEPS
    assert est.n_iter_ == math.ceil(AUTO_MAX_STEPS / math.ceil(n / batch))
    assert not est.converged_


def test_integer_budget_still_counts_epochs():
    X = _table(n=300)
    est = VAEDensity(n_components=1, init="random", early_stopping=False, max_iter=7,
                     tol=0, n_iter_no_change=10**6, **TINY).fit(X)
    assert est.n_iter_ == 7 and len(est.loss_curve_) == 7
    assert est.n_steps_ == 7 * math.ceil(300 / 128)


def test_convergence_warnings_name_the_parameter_of_their_stage():
    X = _table(n=200)
    with pytest.warns(ConvergenceWarning) as record:
        MAPADensity(n_components=1, max_iter=1, refine_iter=1, init="random", **TINY).fit(X)
    messages = [str(w.message) for w in record if issubclass(w.category, ConvergenceWarning)]
    assert any("'mapa'" in m and "increase max_iter" in m for m in messages)
    assert any("'refine'" in m and "increase refine_iter" in m for m in messages)


# ----------------------------------------------------------------------
# early stopping where the estimator overfits
# ----------------------------------------------------------------------
@pytest.mark.parametrize("Estimator, n, expected", [
    (VAEDensity, 300, True), (IWAEDensity, 300, True), (VAEDensity, 1200, False),
    (VAEDensity, 60, True),  # 10 validation rows, not 6
    (IWAEDensity, 16, True),  # a quarter of the rows: 4
    (VAEDensity, 15, False),  # 3 validation rows are too few
    (MAPADensity, 300, False),
])
def test_auto_early_stopping(Estimator, n, expected):
    est = Estimator(n_components=1, max_iter=1, init="random", **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(_table(n=n))
    assert est.early_stopping_ is expected
    assert (est.validation_scores_ is not None) is expected
    assert est.early_stopping == "auto"


@pytest.mark.parametrize("n, n_components, refine_iter, validated", [
    (5000, 1, "auto", True), (4999, 1, "auto", False), (5000, 2, "auto", False),
    (5000, 1, 3, False),
])
def test_mapa_second_phase_holds_out_rows_from_5000_rows_with_one_latent_dim(
        n, n_components, refine_iter, validated, monkeypatch):
    from skmapa import mapa
    seen = []
    bound = mapa.MAPADensity._refine_bound

    def spy(self, x, idx, log_q, generator, rows=None):
        seen.append(x.shape[0])
        return bound(self, x, idx, log_q, generator, rows=rows)

    monkeypatch.setattr(mapa.MAPADensity, "_refine_bound", spy)
    est = MAPADensity(n_components=n_components, max_iter=0, refine_iter=refine_iter,
                      n_iter_no_change=2, tol=10.0, kernel="global", **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(_table(n=n))
    assert (est.validation_scores_ is not None) is validated
    assert est.early_stopping_ is False  # every row is still an atom
    assert est.codes_.shape[0] == n
    if validated:
        # a tenth of the rows scored for validation (the start and the
        # linear model compared before the stage, the start of the stage,
        # then once per round), never in a training batch
        assert len(est.validation_scores_) >= 1
        assert seen.count(500) == len(est.validation_scores_) + 3
        assert est.converged_  # stopped by the validation rule (tol=10)
    else:
        assert 500 not in seen


def test_validation_from_the_start_keeps_a_start_that_training_only_worsens(monkeypatch):
    """With a validation loss that only rises, the stage ends where it began."""
    from skmapa import _base

    X = _table(n=300)
    est = VAEDensity(n_components=1, init="pca", max_iter=5, early_stopping=True, **TINY)
    calls = []
    real = _base.BaseDeepDensity._run_stage

    def run_stage(self, stage, generator, monitor=True):
        stage.validation_loss = lambda: torch.tensor(float(len(calls.append(1) or calls)))
        return real(self, stage, generator, monitor)

    monkeypatch.setattr(_base.BaseDeepDensity, "_run_stage", run_stage)
    start = VAEDensity(n_components=1, init="pca", max_iter=0, early_stopping=True,
                       **TINY).fit(X)
    est.fit(X)
    np.testing.assert_array_equal(est.score_samples(X[:20]), start.score_samples(X[:20]))


def test_init_auto_trains_from_both_starts_and_keeps_one():
    X = _table(n=300)
    est = VAEDensity(n_components=1, max_iter=3, **TINY).fit(X)
    assert set(est.init_scores_) == {"pca", "random"}
    steps_per_epoch = math.ceil(270 / 128)  # 30 validation rows held out
    assert est.n_steps_ == 2 * 3 * steps_per_epoch  # both runs are the fit's cost
    assert est.n_iter_ == 3 and len(est.loss_curve_) == 3  # the kept run
    for init in ("pca", "random"):
        assert VAEDensity(n_components=1, max_iter=3, init=init, **TINY).fit(X).init_scores_ \
            is None


# ----------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------
def test_thread_blocks_nest_and_restore():
    with torch_threads(3):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3


def test_resolve_n_threads():
    cpu = torch.device("cpu")
    with torch_threads(2):
        assert resolve_n_threads("auto", 1e6, cpu) == 1
        assert resolve_n_threads("auto", 100 * FLOPS_PER_THREAD, cpu) == 2  # the budget
        assert resolve_n_threads(None, 1e6, cpu) == 2
        assert resolve_n_threads(3, 1e6, cpu) == 3


@pytest.mark.parametrize("n_threads, inside", [("auto", 1), (None, 2), (2, 2)])
def test_fit_and_score_run_on_the_chosen_threads_and_restore(monkeypatch, n_threads, inside):
    from skmapa import _base

    seen = []
    real = _base.BaseDeepDensity._run_stage

    def run_stage(self, stage, generator, monitor=True):
        seen.append(torch.get_num_threads())
        return real(self, stage, generator, monitor)

    monkeypatch.setattr(_base.BaseDeepDensity, "_run_stage", run_stage)
    X = _table(n=200)
    with torch_threads(2):
        est = VAEDensity(n_components=2, max_iter=1, init="random", n_threads=n_threads,
                         **TINY).fit(X)
        assert torch.get_num_threads() == 2
        real_px = est._log_px_importance

        def log_px(Xs):
            seen.append(torch.get_num_threads())
            return real_px(Xs)

        est._log_px_importance = log_px
        est.set_params(score_method="importance")
        est.score_samples(X[:5])  # 1024 draws each: scoring obeys the same rule
        assert torch.get_num_threads() == 2
    assert len(seen) == 2 and set(seen) == {inside}


# ----------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------
def test_verbose_reports_every_stage_with_elapsed_times(capsys):
    X = _table(n=300, D=3)
    MAPADensity(n_components=1, max_iter=2, refine_iter=1, verbose=1, **TINY).fit(X)
    out = capsys.readouterr().out
    for label in ("a priori: neighbour index", "a priori: bandwidth", "mapa-init[spectral, angle, pca]", "candidate bounds", "[MAPADensity] mapa:",
                  "second phase: refine_method=", "refine:"):
        assert label in out, label
    times = [float(t) for t in re.findall(r"\((\d+\.\d) s\)", out)]
    assert times and max(times) < 600  # since fit began, not the machine's uptime
    assert times == sorted(times)


# ----------------------------------------------------------------------
# stacked models (MAPA's candidate starts train as one network)
# ----------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_per_model_clipping_clips_each_model_as_if_alone(sparse):
    gen = torch.Generator().manual_seed(0)
    n_models, n_atoms = 3, 5
    # model 1's gradient is far above the threshold, the others below
    scales = torch.tensor([0.01, 100.0, 0.1], dtype=torch.float64)
    weights = torch.randn(n_models, 4, 2, generator=gen, dtype=torch.float64)
    codes = torch.randn(n_models * n_atoms, 2, generator=gen, dtype=torch.float64)
    w_grad = weights * scales[:, None, None]
    c_grad = codes * scales.repeat_interleave(n_atoms)[:, None]
    stacked = [torch.nn.Parameter(weights.clone()), torch.nn.Parameter(codes.clone())]
    stacked[0].grad = w_grad.clone()
    rows = torch.tensor([0, 3, 5, 6, 12, 14])  # atoms of every model, not all of them
    if sparse:
        stacked[1].grad = torch.sparse_coo_tensor(rows[None], c_grad[rows], codes.shape,
                                                   check_invariants=True)
    else:
        stacked[1].grad = c_grad.clone()
    largest = clip_grad_norm_per_model(stacked, 10.0, n_models)
    norms = []
    for c in range(n_models):
        alone = [torch.nn.Parameter(weights[c].clone()),
                 torch.nn.Parameter(codes[c * n_atoms:(c + 1) * n_atoms].clone())]
        alone[0].grad = w_grad[c].clone()
        block = c_grad[c * n_atoms:(c + 1) * n_atoms].clone()
        if sparse:
            keep = torch.zeros(n_atoms, dtype=torch.bool)
            keep[rows[(rows // n_atoms) == c] % n_atoms] = True
            block[~keep] = 0
        alone[1].grad = block
        norms.append(clip_grad_norm(alone, 10.0))
        torch.testing.assert_close(stacked[0].grad[c], alone[0].grad)
        got = stacked[1].grad.to_dense() if sparse else stacked[1].grad
        torch.testing.assert_close(got[c * n_atoms:(c + 1) * n_atoms], alone[1].grad)
    assert norms[1] > 10.0 > max(norms[0], norms[2])
    assert largest == pytest.approx(max(norms))


@pytest.mark.parametrize("retire_at", [None, 10])
def test_stacked_decoders_train_as_the_separate_models(retire_at):
    # the same steps (fused Adam, gradients clipped: the loss is scaled far
    # above the threshold) on three decoders and on their stack; with
    # retire_at, model 1 stops training after that many steps (it converged)
    # and the stack computes only models 0 and 2 from then on
    gen = torch.Generator().manual_seed(0)
    decoders = [build(GaussianDecoder, gen, 1, 2, (16, 16), "tanh").double()
                for _ in range(3)]
    x = 5 * torch.randn(40, 2, generator=gen, dtype=torch.float64)
    codes = [torch.randn(40, 1, generator=gen, dtype=torch.float64).requires_grad_()
             for _ in range(3)]
    stacked = StackedDecoders(decoders)
    stacked_codes = torch.nn.Parameter(torch.cat([c.detach() for c in codes]))
    opts = [torch.optim.Adam([*d.parameters(), c], lr=0.01, fused=True)
            for d, c in zip(decoders, codes)]
    stacked_opt = torch.optim.Adam([*stacked.parameters(), stacked_codes], lr=0.01, fused=True)
    active = torch.arange(3)
    retired = None

    def loss(f, scale, dims):
        return 1e3 * (((x[batch] - f) / scale) ** 2).sum(dims) + torch.log(scale).sum(dims)

    for step in range(30):
        if step == retire_at:
            retired = (stacked.model_state(1), stacked_codes.detach()[40:80].clone())
            active = torch.tensor([0, 2])
            stacked.set_active(active)
        batch = torch.randperm(40, generator=gen)[:16]
        for c in active.tolist():
            opts[c].zero_grad()
            loss(decoders[c](codes[c][batch]), decoders[c].scale, None).backward()
            clip_grad_norm([*decoders[c].parameters(), codes[c]], 10.0)
            opts[c].step()
        stacked_opt.zero_grad()
        f = stacked(torch.nn.functional.embedding(batch + active[:, None] * 40, stacked_codes))
        assert f.shape == (len(active), 16, 2)
        loss(f, stacked.scale, (-2, -1)).sum().backward()
        assert clip_grad_norm_per_model([*stacked.parameters(), stacked_codes], 10.0, 3) > 10
        stacked_opt.step()
    for c, d in enumerate(decoders):
        state, got = ((stacked.model_state(c), stacked_codes[c * 40:(c + 1) * 40])
                      if retired is None or c != 1 else retired)
        assert set(state) == set(d.state_dict())
        for key, value in d.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, codes[c], rtol=1e-12, atol=1e-12)
    assert stacked.rows_forward == sum(d.mean_net.rows_forward for d in decoders)


def test_each_stacked_model_converges_on_its_own():
    # model 0's loss is flat (its rule fires after n_iter_no_change rounds),
    # model 1's falls for a while: the stage goes on until both converged
    est = MAPADensity(n_iter_no_change=3, tol=1e-3, learning_rate_init=0.05, batch_size=4)
    est.device_, est.n_steps_, est.n_iter_ = torch.device("cpu"), 0, 0
    est.loss_curve_, est.validation_scores_ = [], None
    p = torch.nn.Parameter(torch.zeros(2, 1, dtype=torch.float64))

    def batch_loss(idx, generator):
        per_model = torch.stack([0 * p[0, 0] + 1.0, (p[1, 0] - 20.0) ** 2])
        return per_model.sum(), per_model.detach()

    converged_at = {}
    stage = TrainingStage("two", 8, batch_loss, [p], "auto", max_steps=3000, n_models=2)
    stage.model_converged = lambda c: converged_at.setdefault(c, est.n_steps_)
    still_training = []
    stage.set_active = lambda active: still_training.append((est.n_steps_, list(active)))
    converged, _ = est._run_stage(stage, torch.Generator().manual_seed(0))
    assert converged and set(converged_at) == {0, 1}
    # once model 0 converged, only model 1 is computed
    assert still_training == [(converged_at[0], [1])]
    assert converged_at[0] == 4 * WINDOW_STEPS  # the first round sets the best
    assert converged_at[1] > converged_at[0] and est.n_steps_ == converged_at[1]
    assert float(p.detach()[1, 0]) == pytest.approx(20.0, abs=0.1)
    assert len(stage.round_losses) == est.n_steps_ // WINDOW_STEPS
    assert np.shape(stage.round_losses[0]) == (2,)



def _noisy_quadratic_stage(average_decay, iterates):
    """A stage on a noisy quadratic with its minimum at 3 in each of 400
    coordinates; ``iterates`` collects the parameters before each step."""
    p = torch.nn.Parameter(torch.zeros(400, dtype=torch.float64))

    def batch_loss(idx, generator):
        iterates.append(p.detach().clone())
        target = 3.0 + torch.randn(400, generator=generator, dtype=torch.float64)
        loss = 0.5 * ((p - target) ** 2).sum()
        return loss, loss.detach()

    return p, TrainingStage("noisy", 1, batch_loss, [p], 1000, average_decay=average_decay)


def test_a_stage_with_averaging_ends_with_the_average_of_its_iterates():
    """Adam's last iterate jitters around the minimum by about its step size;
    a stage with ``average_decay`` ends with the exponential moving average
    of its iterates (the same path: averaging does not change the steps),
    which is much closer."""
    runs = {}
    for decay in (None, 0.99):
        est = MAPADensity(learning_rate_init=0.05, batch_size=1, n_iter_no_change=10**6)
        est.device_, est.n_steps_, est.n_iter_ = torch.device("cpu"), 0, 0
        est.loss_curve_, est.validation_scores_ = [], None
        iterates = []
        p, stage = _noisy_quadratic_stage(decay, iterates)
        est._run_stage(stage, torch.Generator().manual_seed(0))
        runs[decay] = (p.detach().clone(), iterates)
    last, iterates = runs[None]
    assert len(iterates) == 1000
    for a, b in zip(iterates, runs[0.99][1]):
        assert torch.equal(a, b)
    # the recurrence over the iterates after each step, with its ramp-up
    expected = iterates[0].clone()
    for t, x in enumerate(iterates[1:] + [last], start=1):
        weight = 1.0 - min(0.99, (1.0 + t) / (10.0 + t))
        expected += weight * (x - expected)
    average = runs[0.99][0]
    torch.testing.assert_close(average, expected)
    last_error = float(((last - 3.0) ** 2).mean())
    assert last_error > 1e-4
    # (measured: 0.2 of the last iterate's squared error)
    assert float(((average - 3.0) ** 2).mean()) < 0.3 * last_error


def test_auto_early_stopping_saves_a_tiny_table():
    """40 rows of a Gaussian in 3-D (rank 2 plus noise): with 'auto' the
    VAE and the IWAE hold 10 rows out and end near the true density
    (measured KL 0.14-0.39 for the IWAE, probabilistic PCA 0.10); trained on
    all 40 rows for the whole budget the IWAE fell 39-114 nats per row
    below it."""
    from scipy.stats import multivariate_normal

    for seed, Estimator in [(0, IWAEDensity), (1, IWAEDensity), (2, IWAEDensity),
                            (1, VAEDensity)]:
        rng = np.random.RandomState(seed)
        W = rng.randn(3, 2)
        cov = W @ W.T + 0.1 * np.eye(3)
        X = rng.multivariate_normal(np.zeros(3), cov, size=2040)
        train, test = X[:40], X[40:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = Estimator(random_state=seed).fit(train)
        assert est.early_stopping_
        kl = np.mean(multivariate_normal(np.zeros(3), cov).logpdf(test)
                     - est.score_samples(test))
        assert kl < 1.0, (seed, Estimator.__name__, kl)
