"""Training faults: non-finite losses and gradients, clipping, and Ctrl-C.

Faults are injected generically, by wrapping the ``batch_loss`` (and
``validation_loss``) of every training stage an estimator builds, so every
estimator on the shared base is covered.
"""

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV

import skmapa
from skmapa import _base
from skmapa._base import BaseDeepDensity

ESTIMATORS = [
    obj
    for obj in (getattr(skmapa, name) for name in skmapa.__all__)
    if isinstance(obj, type) and issubclass(obj, BaseDeepDensity)
]
#: Rows and minibatch size of the training data: 3 batches per epoch.
N_ROWS, BATCH = 80, 32
BATCHES_PER_EPOCH = 3


def make(cls, **params):
    """A tiny, fast instance; estimator-specific extra epochs ('*_iter') set to 1.

    ``init='random'``: no trial runs from candidate starts, so the batches
    counted here are those of the training stages; no validation rows unless
    a test asks for them.
    """
    kw = dict(hidden_layer_sizes=(8,), max_iter=3, n_eval_samples=32, batch_size=BATCH,
              random_state=0, init="random", early_stopping=False)
    kw.update({p: 1 for p in cls().get_params() if p.endswith("_iter") and p != "max_iter"})
    kw.update(params)
    return cls(**kw)


@pytest.fixture(scope="module")
def X():
    rng = np.random.RandomState(0)
    t = rng.uniform(0, 1, N_ROWS)
    return np.c_[np.cos(3 * t), np.sin(3 * t), t] + 0.05 * rng.randn(N_ROWS, 3)


@pytest.fixture(params=ESTIMATORS, ids=lambda c: c.__name__)
def Estimator(request):
    return request.param


def state(est):
    """Deep copy of the trained state: network weights and fitted tensors."""
    out = {
        name: copy.deepcopy(module.state_dict()) for name, module in est._networks().items()
    }
    out.update(
        (name, value.detach().clone())
        for name, value in vars(est).items()
        if name.endswith("_") and isinstance(value, torch.Tensor)
    )
    return out


def same_state(a, b):
    if a.keys() != b.keys():
        return False
    for key in a:
        if isinstance(a[key], dict):
            if not all(torch.equal(a[key][k], b[key][k]) for k in a[key]):
                return False
        elif not torch.equal(a[key], b[key]):
            return False
    return True


def inject(monkeypatch, cls, fault=None, validation=None):
    """Wrap every stage's losses; return the log of batch calls.

    ``fault(call, est, stage, loss, report)`` returns the ``(loss, report)``
    the training loop sees (``call`` counts from 1); ``validation(call, est)``
    returns the validation loss.
    """
    original = cls._training_stages
    log = []

    def stages(self, data):
        # lazily, stage by stage: a stage may be built from what the ones
        # before it trained (MAPA's kernel refit), so the original may be a
        # generator
        for stage in original(self, data):
            batch_loss = stage.batch_loss

            def wrapped(idx, generator, batch_loss=batch_loss, stage=stage):
                log.append((stage.name, state(self)))
                loss, report = batch_loss(idx, generator)
                if fault is None:
                    return loss, report
                return fault(len(log), self, stage, loss, report)

            stage.batch_loss = wrapped
            if validation is not None and stage.validation_loss is not None:
                calls = []

                def wrapped_validation(calls=calls):
                    calls.append(None)
                    return validation(len(calls), self)

                stage.validation_loss = wrapped_validation
            yield stage

    monkeypatch.setattr(cls, "_training_stages", stages)
    return log


def first_stage_calls(log):
    return [s for name, s in log if name == log[0][0]]


# ----------------------------------------------------------------------
# non-finite losses and gradients
# ----------------------------------------------------------------------
def nan_loss(calls):
    def fault(call, est, stage, loss, report):
        if call in calls:
            return loss * float("nan"), report
        return loss, report

    return fault


def nan_gradient(calls):
    """A finite loss whose gradient is NaN: 0 * sqrt(0 * p) has d/dp = NaN."""

    def fault(call, est, stage, loss, report):
        if call in calls:
            p = next(p for p in stage.parameters if p.requires_grad)
            return loss + 0.0 * torch.sqrt(0.0 * p.sum()), report
        return loss, report

    return fault


@pytest.mark.parametrize("make_fault", [nan_loss, nan_gradient], ids=["loss", "gradient"])
def test_non_finite_step_restores_the_epoch_and_halves_the_step(
    Estimator, X, monkeypatch, capsys, make_fault
):
    # the second batch of the second epoch fails once
    bad = BATCHES_PER_EPOCH + 2
    log = inject(monkeypatch, Estimator, make_fault({bad}))
    est = make(Estimator, learning_rate_init=1e-3, verbose=1).fit(X)
    first = first_stage_calls(log)
    # the retried epoch starts from the state the failed epoch started from
    epoch_start, retry_start = first[BATCHES_PER_EPOCH], first[bad]
    assert same_state(retry_start, epoch_start)
    assert not same_state(first[bad - 1], epoch_start)
    assert "non-finite loss: restored, lr=0.0005" in capsys.readouterr().out
    # the failed attempt is not an epoch, and no NaN is recorded or returned
    # (MAPA's kernel refit runs the max_iter stage twice)
    max_iter_stages = 2 if getattr(est, "kernel_", None) in ("noise", "denoised") else 1
    assert est.n_iter_ == 3 * max_iter_stages + sum(
        getattr(est, p) for p in est.get_params() if p.endswith("_iter") and p != "max_iter"
    )
    assert np.all(np.isfinite(est.loss_curve_))
    assert np.all(np.isfinite(est.score_samples(X)))
    assert np.all(np.isfinite(est.sample(5, random_state=0)))


@pytest.mark.parametrize("make_fault", [nan_loss, nan_gradient], ids=["loss", "gradient"])
def test_persistent_non_finite_loss_raises_floating_point_error(
    Estimator, X, monkeypatch, make_fault
):
    log = inject(monkeypatch, Estimator, make_fault(range(1, 10**6)))
    est = make(Estimator)
    with pytest.raises(FloatingPointError, match=r"non-finite loss.*learning_rate_init"):
        est.fit(X)
    # every retry stops at its first batch: one try plus MAX_RECOVERIES
    assert len(log) == _base.MAX_RECOVERIES + 1
    assert all(same_state(s, log[0][1]) for _, s in log)
    # a fresh fit that failed leaves no half-fitted model behind
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    with pytest.raises(NotFittedError):
        check_is_fitted(est)


def test_failed_warm_refit_keeps_the_previous_model(Estimator, X, monkeypatch):
    est = make(Estimator, warm_start=True).fit(X)
    before = est.score_samples(X)
    networks = {name: state for name, state in state(est).items() if isinstance(state, dict)}
    inject(monkeypatch, Estimator, nan_loss(range(1, 10**6)))
    with pytest.raises(FloatingPointError):
        est.fit(X)
    after = {name: state for name, state in state(est).items() if isinstance(state, dict)}
    assert same_state(after, networks)
    scores = est.score_samples(X)
    assert np.all(np.isfinite(scores))
    if type(est)._warm_start is BaseDeepDensity._warm_start:
        # nothing but the networks changes in a warm refit: the model is intact
        np.testing.assert_array_equal(scores, before)


def test_huge_learning_rate_raises_a_clear_error(Estimator, X):
    with pytest.raises(FloatingPointError, match="lower learning_rate_init"):
        make(Estimator, learning_rate_init=1e300).fit(X)


@pytest.mark.parametrize("lr", [1.0, 1e3])
def test_large_learning_rate_gives_a_finite_model(Estimator, X, lr):
    est = make(Estimator, learning_rate_init=lr).fit(X)
    assert np.all(np.isfinite(est.loss_curve_))
    scores = est.score_samples(np.r_[X, X + 1.0])
    assert np.all(np.isfinite(scores))


def test_gradients_are_clipped(Estimator, X, monkeypatch):
    clip = _base.clip_grad_norm
    norms = []

    def spy(parameters, max_norm):
        parameters = list(parameters)
        total = clip(parameters, max_norm)
        after = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters
                         if p.grad is not None])
        )
        norms.append((float(max_norm), float(total), float(after)))
        return total

    monkeypatch.setattr(_base, "clip_grad_norm", spy)
    # a loss scaled by 1e6 has gradients far above the clipping threshold
    inject(monkeypatch, Estimator, lambda call, est, stage, loss, report: (1e6 * loss, report))
    make(Estimator).fit(X)
    assert norms and all(m == _base.MAX_GRAD_NORM for m, _, _ in norms)
    assert max(total for _, total, _ in norms) > 100 * _base.MAX_GRAD_NORM
    assert all(after <= _base.MAX_GRAD_NORM * (1 + 1e-6) for _, _, after in norms)


def _small_parameters():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return list(module.parameters())


def test_fused_adam_steps_exactly_as_torch_adam():
    a, b = _small_parameters(), _small_parameters()
    reference = torch.optim.Adam(a, lr=0.01, fused=True)
    fast = _base._Optimizers([_base._FusedAdam(b, lr=0.01)])
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        if step == 10:
            # a lowered learning rate (the recovery after a non-finite loss)
            for group in reference.param_groups + fast.param_groups:
                group["lr"] = 0.003
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        if step < 3 or step == 12:
            # a parameter this step does not train: no state yet, then skipped
            a[0].grad = b[0].grad = None
        reference.step()
        fast.step()
    opt = fast.optimizers[0]
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reference.state[p][key], opt.state[q][key])
            assert reference.state[p][key].dtype == opt.state[q][key].dtype
    assert float(opt.state[b[0]]["step"]) == 21 and float(opt.state[b[1]]["step"]) == 25


def test_fused_adamw_steps_exactly_as_torch_adamw():
    """The decayed parameters step as AdamW's, the others as Adam's, bit for
    bit (AdamW with the two kinds in groups of their own)."""
    a, b = _small_parameters(), _small_parameters()
    decayed = [0, 2]  # the two weight matrices
    reference = torch.optim.AdamW(
        [{"params": [a[i] for i in decayed], "weight_decay": 0.3},
         {"params": [a[i] for i in (1, 3)], "weight_decay": 0.0}], lr=0.01, fused=True)
    fast = _base._FusedAdam(b, lr=0.01, decayed=[b[i] for i in decayed], weight_decay=0.3)
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        if step == 10:
            for group in reference.param_groups + fast.param_groups:
                group["lr"] = 0.003
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        reference.step()
        fast.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    # and the decay did something: Adam alone ends elsewhere
    c = _small_parameters()
    plain = _base._FusedAdam(c, lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        for p in c:
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 10:
            plain.param_groups[0]["lr"] = 0.003
        plain.step()
    assert not torch.equal(c[0], b[0]) and not torch.equal(c[2], b[2])
    assert torch.equal(c[1], b[1]) and torch.equal(c[3], b[3])


def test_fused_adam_restores_a_snapshot():
    params = _small_parameters()
    opt = _base._FusedAdam(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = _base._clone(opt.state_dict())
    opt.step()
    opt.param_groups[0]["lr"] = 0.5
    assert all(float(opt.state[p]["step"]) == 2 for p in params)
    for _ in range(2):  # a snapshot can be restored more than once
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["lr"] == 0.01
        assert all(float(opt.state[p]["step"]) == 1 for p in params)
        opt.step()
    assert float(saved["state"][0]["step"]) == 1


def test_snapshots_are_independent_copies():
    params = _small_parameters()
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.Adam(params, lr=0.01, fused=True)
    opt.step()
    module = torch.nn.Linear(2, 3)
    state, saved = opt.state_dict(), _base._clone(opt.state_dict())
    saved_module = _base._clone(module.state_dict())
    assert saved_module._metadata == module.state_dict()._metadata
    opt.step()
    with torch.no_grad():
        module.weight.add_(1.0)
    assert saved["param_groups"] == state["param_groups"]
    for key, value in saved["state"].items():
        assert torch.equal(value["step"], torch.tensor(1.0))
        assert not torch.equal(value["exp_avg"], opt.state_dict()["state"][key]["exp_avg"])
    assert not torch.equal(saved_module["weight"], module.weight)
    opt.load_state_dict(saved)
    module.load_state_dict(saved_module)
    assert torch.equal(module.weight, saved_module["weight"])
    assert all(torch.equal(opt.state[p]["step"], torch.tensor(1.0)) for p in params)


def test_non_finite_validation_loss_does_not_break_training(Estimator, X, monkeypatch):
    inject(monkeypatch, Estimator, validation=lambda call, est: torch.tensor(float("nan")))
    est = make(Estimator, early_stopping=True).fit(X)
    assert np.all(np.isfinite(est.score_samples(X)))


# ----------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------
def interrupt_at(call_to_interrupt):
    def fault(call, est, stage, loss, report):
        if call == call_to_interrupt:
            raise KeyboardInterrupt
        return loss, report

    return fault


def assert_usable(est, X):
    scores = est.score_samples(X)
    assert np.all(np.isfinite(scores))
    assert est.sample(4, random_state=0).shape == (4, X.shape[1])
    assert est.transform(X[:5]).shape == (5, est.n_components)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).score_samples(X), scores)
    pytest.importorskip("safetensors")
    buf = io.BytesIO()
    skmapa.save(est, buf)
    buf.seek(0)
    np.testing.assert_array_equal(skmapa.load(buf).score_samples(X), scores)


@pytest.mark.parametrize("epochs_done", [0, 2])
def test_interrupt_keeps_a_usable_model_and_propagates(Estimator, X, monkeypatch, epochs_done):
    # interrupt at the second batch of epoch ``epochs_done + 1``
    call = epochs_done * BATCHES_PER_EPOCH + 2
    log = inject(monkeypatch, Estimator, interrupt_at(call))
    est = make(Estimator, max_iter=10)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="interrupted"):
        est.fit(X)
    assert len(log) == call
    assert est.converged_ is False
    assert est.n_iter_ == epochs_done and len(est.loss_curve_) == epochs_done
    # the model holds the training progress up to the interrupt
    assert not same_state(state(est), log[0][1])
    assert_usable(est, X)


def test_interrupt_with_early_stopping_restores_the_best_epoch(Estimator, X, monkeypatch):
    # validation losses at the start of the stage, then by epoch: the second
    # epoch is the best; the interrupt comes during the fifth, whose state is
    # worse
    losses = [6.0, 5.0, 1.0, 3.0, 4.0]
    at_validation = []

    def validation(call, est):
        at_validation.append(state(est))
        return torch.tensor(losses[call - 1], dtype=torch.float64)

    after_last = []

    def fault(call, est, stage, loss, report):
        if len(at_validation) == len(losses):
            after_last.append(call)
            if len(after_last) == 2:
                raise KeyboardInterrupt
        return loss, report

    inject(monkeypatch, Estimator, fault, validation)
    est = make(Estimator, early_stopping=True, max_iter=10, n_iter_no_change=50)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="interrupted"):
        est.fit(X)
    assert est.validation_scores_ == [-v for v in losses[1:]]  # one per epoch
    assert est.converged_ is False
    best = at_validation[int(np.argmin(losses))]
    assert same_state(state(est), best)
    assert not same_state(state(est), at_validation[-1])
    assert_usable(est, X)


def test_interrupt_during_a_warm_refit(Estimator, X, monkeypatch):
    est = make(Estimator, warm_start=True).fit(X)
    n_iter = est.n_iter_
    inject(monkeypatch, Estimator, interrupt_at(BATCHES_PER_EPOCH + 1))
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="interrupted"):
        est.fit(X)
    assert est.n_iter_ == n_iter + 1 and est.converged_ is False
    assert_usable(est, X)


def test_interrupt_stops_a_grid_search(X, monkeypatch):
    cls = skmapa.VAEDensity
    log = inject(monkeypatch, cls, interrupt_at(2))
    search = GridSearchCV(make(cls), {"n_components": [1, 2]}, cv=2, error_score=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            search.fit(X)
    assert len(log) == 2
