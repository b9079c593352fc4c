"""Weight decay: AdamW's decoupled decay on the networks' weight matrices."""

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import FactorAnalysis

from skmapa import IWAEDensity, MAPADensity, VAEDensity
from skmapa import _base
from skmapa import mapa as mapa_module
from skmapa.datasets import make_circle
from skmapa._networks import GaussianDecoder, GaussianEncoder, StackedDecoders, build, \
    decayed_weights


def test_decayed_weights_are_the_layer_weights_only():
    gen = torch.Generator().manual_seed(0)
    decoder = build(GaussianDecoder, gen, 2, 5, (8, 8), "tanh")

    def names(module):
        chosen = decayed_weights(module)
        return {n for n, p in module.named_parameters() if any(p is w for w in chosen)}

    # not the biases, the linear part or the noise scale
    assert names(decoder) == {f"mean_net.net.{i}.weight" for i in (0, 2, 4)}
    stacked = StackedDecoders([decoder, copy.deepcopy(decoder)])
    assert names(stacked) == {f"weights.{i}" for i in range(3)}
    encoder = build(GaussianEncoder, gen, 5, 2, (8,), "tanh")
    assert names(encoder) and all(n.endswith(".weight") for n in names(encoder))


def _linear_table(n=400, D=5, seed=0):
    rng = np.random.RandomState(seed)
    W = rng.normal(size=(D, 2))
    return rng.normal(size=(n, 2)) @ W.T + 0.3 * rng.normal(size=(n, D))


@pytest.mark.parametrize("Estimator, expected", [
    (MAPADensity, 0.0), (VAEDensity, 0.0), (IWAEDensity, 0.0)])
def test_auto_weight_decay(Estimator, expected):
    X = _linear_table(n=60)
    kw = dict(hidden_layer_sizes=(8,), max_iter=2, random_state=0)
    if Estimator is MAPADensity:
        kw["refine_iter"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Estimator(**kw).fit(X).weight_decay_ == expected
        assert Estimator(weight_decay=0.25, **kw).fit(X).weight_decay_ == 0.25


def _assert_layers_near_zero(decoder):
    for m in decoder.mean_net.net:
        if isinstance(m, torch.nn.Linear):
            # (Adam's update moves an entry by about the learning rate)
            assert float(m.weight.detach().abs().max()) < 5e-3


@pytest.mark.parametrize("fused", [True, False])
def test_full_weight_decay_leaves_the_linear_model(fused, monkeypatch):
    """With learning_rate_init * weight_decay = 1, AdamW zeroes the layers'
    weights before each step's update: they stay within a step of zero,
    and the decoder is (to that) f(z) = b + W z with per-feature noise,
    factor analysis, whose maximum likelihood scikit-learn computes. On
    rows of a linear-Gaussian model the VAE then scores as factor analysis
    does; MAPA's decoder is linear too and cannot score above it."""
    monkeypatch.setattr(_base, "_FUSED_ADAM", fused and _base._FUSED_ADAM)
    X = _linear_table()
    fa = FactorAnalysis(2, tol=1e-8, max_iter=10000).fit(X).score(X)
    kw = dict(n_components=2, hidden_layer_sizes=(8,), weight_decay=1e3, random_state=0)
    vae = VAEDensity(init="pca", early_stopping=False, **kw).fit(X)
    _assert_layers_near_zero(vae.decoder_)
    assert fa - 0.02 < vae.score(X) < fa + 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapa = MAPADensity(max_iter=20, refine_iter=20, **kw).fit(X)
    _assert_layers_near_zero(mapa.decoder_)
    assert mapa.score(X) < fa + 0.01


def _stage_decays(monkeypatch):
    """Record (stage name, the weight decay its optimizer was given)."""
    seen, stages = [], []
    run_rounds = _base.BaseDeepDensity._run_rounds

    def spy_rounds(self, stage, *args):
        stages.append(stage.name)
        return run_rounds(self, stage, *args)

    class SpyAdam(_base._FusedAdam):
        def __init__(self, *args, weight_decay=0.0, **kwargs):
            seen.append((stages[-1], weight_decay))
            super().__init__(*args, weight_decay=weight_decay, **kwargs)

    monkeypatch.setattr(_base.BaseDeepDensity, "_run_rounds", spy_rounds)
    monkeypatch.setattr(_base, "_FusedAdam", SpyAdam)
    monkeypatch.setattr(_base, "_FUSED_ADAM", True)
    return seen


def auto_decay(n_rows, n_features=0):
    """The decay 'auto' uses where it applies, on ``n_rows`` training rows
    of ``n_features`` features with one latent dimension (0: any other fit;
    written out here, not taken from the estimator)."""
    rows = max(mapa_module.REFINE_WEIGHT_DECAY_ROWS,
               mapa_module.DECAY_ROWS_PER_FEATURE_1D * n_features)
    return mapa_module.REFINE_WEIGHT_DECAY * max(1.0, rows / n_rows)**0.5


@pytest.mark.skipif(not _base._FUSED_ADAM, reason="needs the fused AdamW kernel")
@pytest.mark.parametrize("noise, n_components, first, expected", [
    (0.02, 1, auto_decay(300), auto_decay(300)),
    (1.0, 1, 0.0, 0.0), (0.02, 2, 0.0, 0.0)])
def test_mapa_auto_decays_the_second_phase_near_a_manifold(
        noise, n_components, first, expected, monkeypatch):
    """'auto': the second phase decays where the first left less than
    REFINE_WEIGHT_DECAY_MAX_NOISE of the variance to the noise and the codes
    have fewer dimensions than the rows (a circle with little noise, one
    latent dimension), not on noisy rows and not with as many latent
    dimensions as features; the first phase decays with one latent
    dimension near a densely sampled curve only (local_residual_)."""
    seen = _stage_decays(monkeypatch)
    X = make_circle(300, noise=noise, random_state=0).X
    est = MAPADensity(n_components=n_components, hidden_layer_sizes=(16,),
                      learning_rate_init=1e-2, max_iter=100, refine_iter=2,
                      random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    decays = dict(seen)
    assert decays.pop("refine") == expected == est.weight_decay_
    assert decays and set(decays.values()) == {first}
    assert (est.local_residual_ is None) == (n_components == 2)
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.set_params(weight_decay=0.25).fit(X)
    assert {d for _, d in seen} == {0.25} and est.weight_decay_ == 0.25


@pytest.mark.skipif(not _base._FUSED_ADAM, reason="needs the fused AdamW kernel")
@pytest.mark.parametrize("n_components, expected", [
    (mapa_module.DECAY_MIN_COMPONENTS - 2, 0.0),
    (mapa_module.DECAY_MIN_COMPONENTS, auto_decay(300))])
def test_mapa_auto_decays_both_phases_with_many_latent_dimensions(
        n_components, expected, monkeypatch):
    """'auto' on a noisy table (nothing decays with four latent dimensions)
    decays every stage of both phases from DECAY_MIN_COMPONENTS latent
    dimensions on (measured in docs/user_guide/mapa.rst, "High-dimensional
    data")."""
    seen = _stage_decays(monkeypatch)
    X = _linear_table(n=300, D=12)
    X += np.random.RandomState(1).normal(size=X.shape)  # mostly noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MAPADensity(n_components=n_components, hidden_layer_sizes=(8,),
                          max_iter=2, refine_iter=2, random_state=0).fit(X)
    stages = dict(seen)
    assert "refine" in stages and len(stages) > 1
    assert set(stages.values()) == {expected} and est.weight_decay_ == expected


@pytest.mark.parametrize("decay, steps", [(0.0, 20), (0.1, 40)])
def test_a_decaying_second_phase_runs_longer(decay, steps, monkeypatch):
    """With two latent dimensions the 'auto' budget of the second phase is
    REFINE_MAX_STEPS, or up to REFINE_MAX_STEPS_DECAYED where it decays."""
    monkeypatch.setattr(mapa_module, "REFINE_MAX_STEPS", 20)
    monkeypatch.setattr(mapa_module, "REFINE_MAX_STEPS_DECAYED", 40)
    monkeypatch.setattr(mapa_module, "REFINE_EPOCHS_DECAYED", 100)
    X = _linear_table(n=200)
    kw = dict(hidden_layer_sizes=(8,), max_iter=2, tol=0.0, n_iter_no_change=10**9,
              weight_decay=decay, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = MAPADensity(refine_iter=0, **kw).fit(X)
        with_auto = MAPADensity(**kw).fit(X)
    assert with_auto.n_steps_ - without.n_steps_ == steps
