"""Shared machinery of the estimators with an encoder network (VAE, IWAE).

Training is a list of ``TrainingStage``s composed from two choices:

* ``training="joint"`` trains the decoder and the (first) encoder together on
  the estimator's bound; ``training="libi"`` (likelihood before inference,
  Yacoby, Pan & Doshi-Velez) first fits the decoder alone by maximum
  likelihood on a prior-sampled estimate of log p(x), then the encoder alone
  on the estimator's bound with the decoder frozen.
* ``encoder="gaussian"`` is one Gaussian q(z | x); ``encoder="recursive"``
  (Kim & Pavlovic, 2020) grows a Gaussian mixture one component per extra
  stage: the new component maximises its ELBO plus a weighted KL divergence
  from the current mixture, and its amortized weight maximises the mixture's
  bound. With 'joint' training the decoder maximises the mixture's bound as
  well, and the earlier components and weights keep training (they must
  follow the decoder); with 'libi' they stay as their stage left them.
"""

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions

from ._base import AVERAGE_DECAY, INIT_SELECTION_ROWS, BaseDeepDensity, TrainingStage
from ._mixture_encoder import MixtureEncoder
from ._networks import DetachedDecoder, GaussianDecoder, GaussianEncoder, build
from ._objectives import prior_marginal_bound, recursive_component_criterion
from ._scoring import add_prior_component

#: The encoder's standard deviations are widened by this factor in the
#: importance-sampling proposal: amortized posteriors tend to be too narrow,
#: and a proposal narrower than the posterior has unbounded weights.
PROPOSAL_WIDENING = 1.5
#: Shift of the fixed prior draws that score the LiBI validation bound.
_VALIDATION_SHIFT = 0.5
#: Weight of the prior in the mixture that a new component diverges from:
#: KL(q_m || Q) rewards draws where Q is small without limit when Q's tails
#: are lighter than the posterior's (a saturating decoder, a narrow encoder),
#: and the new component then runs off to infinity. Against
#: ``(1 - w) Q + w N(0, I)`` the reward grows at most like the prior's
#: log-density, which the prior term of the ELBO outweighs (kl_weight < 1).
KL_PRIOR_WEIGHT = 0.1
#: Initial weight eps_m(x) of every new mixture component: small, so that a
#: fresh (untrained) component does not disturb the mixture bound on which
#: the decoder is trained while the component learns.
INITIAL_COMPONENT_WEIGHT = 0.05
#: Without early stopping (1000 rows and more at the defaults) rows that lack
#: a low-dimensional structure (``_lacks_structure``) are held out below this
#: many rows, to choose between the two starts of ``init='auto'`` and to judge
#: the fallback to the linear model, not to stop training. Chosen on training
#: rows, the random start that had fitted them was kept: the IWAE ended 0.37
#: nats per held-out row below probabilistic PCA on 1000 rows of Gaussian noise
#: in 10-D, 0.35 on make_gaussian_quantiles, 0.04-0.06 on make_friedman1 (2000
#: rows); now at it, and 0.19 above it on one friedman seed. Measured in
#: docs/user_guide/choosing_parameters.rst and the ``structureless`` suite.
STRUCTURELESS_HOLD_OUT_BELOW_ROWS = 5000

_AMORTIZED_PARAMETERS = """
    training : {'joint', 'libi'}, default='joint'
        'joint' trains the decoder and the encoder together on the training
        bound. 'libi' (likelihood before inference; Yacoby, Pan &
        Doshi-Velez) runs two stages: first the decoder and noise alone, by
        maximum likelihood on ``log (1/S) sum_s p(x | z_s)`` with
        ``S = libi_samples`` prior draws ``z_s`` (fresh every minibatch and
        shared by its rows), then the encoder alone on the training bound
        with the decoder frozen; each stage runs up to ``max_iter`` epochs.
        Meant for low-dimensional latent spaces, where tens to hundreds of
        prior draws cover the prior.
    libi_samples : int, default=64
        Prior draws per minibatch in the first stage of ``training='libi'``:
        a randomly shifted quasi-Monte Carlo set (each draw exactly N(0, I)).
    encoder : {'gaussian', 'recursive'}, default='gaussian'
        'gaussian' is one Gaussian q(z | x). 'recursive' (Kim & Pavlovic,
        2020) is a mixture of ``n_mixture_components`` Gaussians grown one
        component per training stage: component m maximises its ELBO plus
        ``mixture_kl_weight`` times its KL divergence from the current
        mixture, and its amortized weight eps_m(x) maximises the bound of
        the mixture ``Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m``. With
        ``training='joint'`` the decoder also maximises the bound of Q_m and
        the earlier components and weights keep training on their own
        criteria (they follow the decoder); with 'libi' each stage trains
        only its new component and weight. The mixture is the
        importance-sampling proposal of ``score_samples`` and ``transform``
        is its mean. Every stage runs up to ``max_iter`` epochs.
    n_mixture_components : int, default=4
        Mixture components of ``encoder='recursive'`` (1 is one Gaussian).
    mixture_kl_weight : float in [0, 1), default=0.25
        Weight of ``KL(q_m || Q_{m-1})`` in the criterion of a new component
        (Q_{m-1} mixed with the prior at 10 %, which keeps the criterion
        bounded); 0 fits each component to the ELBO alone, values near 1
        leave little entropy and pull components to points.
"""

_AMORTIZED_ATTRIBUTES = """
    encoder_ : torch.nn.Module
        The inference network q(z | x); ``transform`` returns its mean
        (a ``MixtureEncoder`` when ``encoder='recursive'``).
    init_scores_ : dict or None
        With ``init='auto'``: minus the estimated log-likelihood per row
        (standardized units) of the validation rows, or of up to 1000
        training rows, after training from each start, 'pca' and 'random';
        the model with the lower value is kept. None otherwise.
"""


def fill_amortized_doc(cls):
    """Insert the descriptions of the encoder and training-mode parameters."""
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace(
            "%(amortized_parameters)s", _AMORTIZED_PARAMETERS.strip("\n")
        ).replace("%(amortized_attributes)s", _AMORTIZED_ATTRIBUTES.strip("\n"))
    return cls


class AmortizedDensity(BaseDeepDensity):
    """A decoder and an amortized encoder, trained in stages (see module doc).

    Subclasses implement, for their bound (ELBO, IWAE bound):

    * ``_gaussian_bound(x, generator, encoder, decoder)``: per-row
      ``(surrogate, bound)`` with the Gaussian encoder ``encoder``
      (a callable ``x -> (mu, log_std)``);
    * ``_mixture_bound(x, generator, mixture, decoder)``: the same with the
      Gaussian mixture ``mixture = (means, log_stds, log_weights)``;
    * ``_n_draws``: reparameterised draws per row in the criterion of a new
      mixture component.

    ``_row_bound(x, generator)`` is the fitted model's bound.
    """

    _parameter_constraints = {
        **BaseDeepDensity._parameter_constraints,
        "training": [StrOptions({"joint", "libi"})],
        "libi_samples": [Interval(Integral, 1, None, closed="left")],
        "encoder": [StrOptions({"gaussian", "recursive"})],
        "n_mixture_components": [Interval(Integral, 1, None, closed="left")],
        "mixture_kl_weight": [Interval(Real, 0, 1, closed="left")],
    }

    _n_draws = 1

    def __init__(
        self,
        *,
        training="joint",
        libi_samples=64,
        encoder="gaussian",
        n_mixture_components=4,
        mixture_kl_weight=0.25,
        n_components=2,
        hidden_layer_sizes=(64, 64),
        activation="tanh",
        batch_size="auto",
        learning_rate_init=1e-3,
        weight_decay="auto",
        init="auto",
        max_iter="auto",
        tol=1e-4,
        early_stopping="auto",
        validation_fraction=0.1,
        n_iter_no_change=10,
        warm_start=False,
        score_method="auto",
        n_eval_samples=1024,
        random_state=None,
        verbose=0,
        device="auto",
        n_threads="auto",
        dtype="auto",
    ):
        super().__init__(
            n_components=n_components,
            hidden_layer_sizes=hidden_layer_sizes,
            activation=activation,
            batch_size=batch_size,
            learning_rate_init=learning_rate_init,
            weight_decay=weight_decay,
            init=init,
            max_iter=max_iter,
            tol=tol,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change,
            warm_start=warm_start,
            score_method=score_method,
            n_eval_samples=n_eval_samples,
            random_state=random_state,
            verbose=verbose,
            device=device,
            n_threads=n_threads,
            dtype=dtype,
        )
        self.training = training
        self.libi_samples = libi_samples
        self.encoder = encoder
        self.n_mixture_components = n_mixture_components
        self.mixture_kl_weight = mixture_kl_weight

    # ------------------------------------------------------------------
    # networks
    # ------------------------------------------------------------------
    def _network_specs(self, n_features):
        sizes = tuple(int(s) for s in self.hidden_layer_sizes)
        if self.encoder == "recursive":
            encoder = (MixtureEncoder, n_features, self.n_components,
                       int(self.n_mixture_components), sizes, self.activation)
        else:
            encoder = (GaussianEncoder, n_features, self.n_components, sizes,
                       self.activation)
        return {
            "decoder_": (GaussianDecoder, self.n_components, n_features, sizes,
                         self.activation),
            "encoder_": encoder,
        }

    _auto_early_stopping_below = 1000

    def _initialize(self, data, generator):
        for name, (cls, *args) in self._network_specs(data.X.shape[1]).items():
            setattr(self, name, build(cls, generator, *args))
        if isinstance(self.encoder_, MixtureEncoder):
            self.encoder_.reset_gates(INITIAL_COMPONENT_WEIGHT)
        self.init_scores_ = None
        self._random_start = None
        if self.init != "random":
            if self.init == "auto":
                self._move_networks()
                self._random_start = self._snapshot(None)
            self._start_linear(self._linear_start(data))

    def _train(self, data, generator, counts_before):
        """With ``init='auto'``: train from both starts, keep the better model.

        The training bound cannot choose: from the PCA start it stays near
        probabilistic PCA's log-likelihood, while from the random start the
        ELBO can end lower even where the model is better (measured on
        make_circles with one latent dimension: ELBO -2.97 vs -2.84 nats,
        held-out log-likelihood -1.58 vs -1.69). So the two are compared by
        the estimated log-likelihood (``score_samples``) of the validation
        rows, or, without early stopping, of up to ``INIT_SELECTION_ROWS``
        training rows. ``loss_curve_``, ``n_iter_`` and ``converged_`` are
        those of the model kept; ``n_steps_`` and ``n_row_passes_`` count
        both runs (the cost of the fit). The model kept then meets the
        linear model (``_fall_back_to_linear``).
        """
        random_start = self.__dict__.pop("_random_start", None)
        if random_start is None:
            return super()._train(data, generator, counts_before)
        X_sel = data.X_val
        if X_sel is None:
            n = data.X.shape[0]
            rows = torch.randperm(n, generator=generator)[:INIT_SELECTION_ROWS]
            X_sel = data.X[rows.to(self.device_)]
        fits = {}
        for name in ("pca", "random"):
            if name == "random":
                self._restore(random_start)
                self.loss_curve_, self.n_iter_ = [], 0
                self.validation_scores_ = [] if self._monitors_held_out(data) else None
            self._train_stages(data, generator, counts_before)
            # the scoring below is part of this fit's cost: counted from here
            counts_before = self._row_counts()
            score = float(np.mean(self._log_px_standardized(X_sel)[0]))
            fits[name] = (score, self._snapshot(None), self.loss_curve_,
                          self.validation_scores_, self.converged_, self.n_iter_)
        self.init_scores_ = {name: -fit[0] for name, fit in fits.items()}
        best = min(self.init_scores_, key=self.init_scores_.get)
        self._progress("estimated log-likelihood per row from each start: " + ", ".join(
            f"{name} {fit[0]:.4f}" for name, fit in fits.items()) + f"; keeping {best}")
        (_, snapshot, self.loss_curve_, self.validation_scores_, self.converged_,
         self.n_iter_) = fits[best]
        self._restore(snapshot)
        self._finish_fit(counts_before, generator)
        self._fall_back_to_linear(data)

    def _structureless_hold_out_below(self):
        """Rows held out of data without structure choose the start kept
        and judge the fallback to the linear model."""
        return STRUCTURELESS_HOLD_OUT_BELOW_ROWS

    def _monitors_held_out(self, data):
        """Only early stopping's rows are monitored: the rows held out of
        data without structure choose the start and judge the fallback but
        do not stop training (on make_classification, 50-D, 1000 rows,
        stopping on them cost the IWAE 0.3-0.4 nats per row)."""
        return data.X_val is not None and self.early_stopping_

    def _start_linear(self, start):
        """Decoder and (first) encoder at the probabilistic PCA solution."""
        self.decoder_.init_linear(start.weight, start.mean, np.sqrt(start.noise_var))
        self._first_encoder().init_linear(*start.posterior())

    def _become_linear(self, start):
        """Decoder and every encoder component at the probabilistic PCA
        solution: the mixture is then the exact posterior, whatever its
        gates."""
        self._start_linear(start)
        if isinstance(self.encoder_, MixtureEncoder):
            for head in self.encoder_.heads[1:]:
                head.init_linear(*start.posterior())

    def _noise(self, shape, generator):
        eps = torch.randn(shape, generator=generator, dtype=torch.float64)
        return eps.to(device=self.device_, dtype=self._torch_dtype)

    def _first_encoder(self):
        """The Gaussian encoder trained first: ``encoder_`` or its first component."""
        if isinstance(self.encoder_, MixtureEncoder):
            return self.encoder_.heads[0]
        return self.encoder_

    # ------------------------------------------------------------------
    # bounds
    # ------------------------------------------------------------------
    def _row_bound(self, x, generator):
        """Per-row ``(surrogate, bound)`` of the model and its whole encoder."""
        if isinstance(self.encoder_, MixtureEncoder):
            return self._mixture_bound(x, generator, self.encoder_(x), self.decoder_)
        return self._gaussian_bound(x, generator, self.encoder_, self.decoder_)

    def _prior_draws(self, base, shift):
        """Shifted quasi-Monte Carlo points mapped to N(0, I): (S, d)."""
        u = torch.remainder(base + shift, 1.0).clamp(1e-12, 1 - 1e-12)
        return torch.special.ndtri(u).to(device=self.device_, dtype=self._torch_dtype)

    # ------------------------------------------------------------------
    # training stages
    # ------------------------------------------------------------------
    def _stage(self, name, data, bound, parameters, before=None):
        """A stage maximising the per-row ``bound(x, generator)`` over ``parameters``."""

        def batch_loss(idx, generator):
            x, w = data.X[idx], data.weights[idx]
            surrogate, value = bound(x, generator)
            return -(w * surrogate).mean(), -(w * value).mean().detach()

        validation = None
        if self._monitors_held_out(data):
            val_generator = torch.Generator()

            def validation():
                _, value = bound(data.X_val, val_generator.manual_seed(0))
                return -(data.weights_val * value).mean()

        return TrainingStage(name, data.X.shape[0], batch_loss, list(parameters),
                             self.max_iter, validation, before=before,
                             average_decay=AVERAGE_DECAY, even_batches=True)

    def _training_stages(self, data):
        first = self._first_encoder()
        if self.training == "libi":
            stages = [
                self._likelihood_stage(data),
                self._stage(
                    "libi-encoder",
                    data,
                    lambda x, g: self._gaussian_bound(
                        x, g, first, DetachedDecoder(self.decoder_)
                    ),
                    first.parameters(),
                ),
            ]
        else:
            stages = [
                self._stage(
                    type(self).__name__.replace("Density", "").lower(),
                    data,
                    lambda x, g: self._gaussian_bound(x, g, first, self.decoder_),
                    list(self.decoder_.parameters()) + list(first.parameters()),
                )
            ]
        if isinstance(self.encoder_, MixtureEncoder):
            stages += [
                self._component_stage(data, m)
                for m in range(1, self.encoder_.n_mixture)
            ]
        return stages

    def _likelihood_stage(self, data):
        """LiBI's first stage: the decoder alone, on a prior-sampled marginal."""
        S, d = int(self.libi_samples), self.n_components
        base = torch.quasirandom.SobolEngine(d, scramble=False).draw(S, dtype=torch.float64)

        def bound(x, generator):
            shift = torch.rand(d, generator=generator, dtype=torch.float64)
            return prior_marginal_bound(x, self.decoder_, self._prior_draws(base, shift))

        stage = self._stage("libi-likelihood", data, bound, self.decoder_.parameters())
        if stage.validation_loss is not None:
            z_val = self._prior_draws(base, torch.full((d,), _VALIDATION_SHIFT,
                                                       dtype=torch.float64))

            def validation():
                _, value = prior_marginal_bound(data.X_val, self.decoder_, z_val)
                return -(data.weights_val * value).mean()

            stage.validation_loss = validation
        return stage

    def _component_stage(self, data, m):
        """Recursive mixture: the stage that adds component ``m`` (0-based).

        Component m maximises ``ELBO + mixture_kl_weight * KL(q_m || Q_{m-1})``
        (Q_{m-1}, the mixture of the components before it, mixed with the
        prior at ``KL_PRIOR_WEIGHT``) against the decoder held fixed, and its
        gate maximises the bound of the mixture Q_m of the first m + 1
        components with the components held fixed. With training 'libi'
        nothing else changes. With training 'joint' the decoder maximises the
        bound of Q_m too, and, since the decoder moves, every earlier
        component keeps training on its own criterion (the first one on the
        estimator's bound, component j against Q_{j-1}) and every earlier
        gate on the bound of Q_m: the simultaneous recursion of Kim &
        Pavlovic, one more component per stage.
        """
        enc = self.encoder_
        joint = self.training == "joint"
        kl_weight = float(self.mixture_kl_weight)
        trained = range(m + 1) if joint else [m]

        def bound(x, generator):
            frozen = DetachedDecoder(self.decoder_)
            parts = []
            for j in range(m + 1):
                if j in trained:
                    parts.append(enc.component(x, j))
                else:
                    with torch.no_grad():
                        parts.append(enc.component(x, j))
            means = torch.stack([p[0] for p in parts], dim=1)
            log_stds = torch.stack([p[1] for p in parts], dim=1)
            if joint:
                logits = enc.gate_logits(x, m + 1)
            else:
                with torch.no_grad():
                    earlier = enc.gate_logits(x, m)
                logits = torch.cat([earlier, enc.gates[m - 1](x)], dim=-1)
            surrogate = 0.0
            for j in trained:
                if j == 0:
                    first = parts[0]
                    value_j, _ = self._gaussian_bound(x, generator, lambda _: first, frozen)
                else:
                    previous = (
                        means[:, :j].detach(),
                        log_stds[:, :j].detach(),
                        enc.weights_from_logits(logits[:, :j - 1].detach()),
                    )
                    eps = self._noise((self._n_draws, *parts[j][0].shape), generator)
                    value_j, _ = recursive_component_criterion(
                        x, frozen, *parts[j],
                        add_prior_component(*previous, KL_PRIOR_WEIGHT), eps, kl_weight,
                    )
                surrogate = surrogate + value_j
            mixture = (means.detach(), log_stds.detach(), enc.weights_from_logits(logits))
            decoder = self.decoder_ if joint else frozen
            mixture_surrogate, value = self._mixture_bound(x, generator, mixture, decoder)
            return surrogate + mixture_surrogate, value

        parameters = []
        for j in trained:
            parameters += list(enc.heads[j].parameters())
        for j in (range(m) if joint else [m - 1]):
            parameters += list(enc.gates[j].parameters())
        if joint:
            parameters += list(self.decoder_.parameters())
        return self._stage(f"component-{m + 1}", data, bound, parameters)

    # ------------------------------------------------------------------
    # scoring proposal and transform
    # ------------------------------------------------------------------
    def _q(self, X):
        """q(z | x) of standardized rows ``X`` as a Gaussian mixture.

        ``(means, log_stds, log_weights)`` of shapes (n, C, d), (n, C, d) and
        (n, C): the encoder itself (C = 1 for the Gaussian encoder), without
        the widening of the scoring proposal.
        """
        if isinstance(self.encoder_, MixtureEncoder):
            return self.encoder_(X)
        mu, log_std = self.encoder_(X)
        return mu.unsqueeze(1), log_std.unsqueeze(1), mu.new_zeros((mu.shape[0], 1))

    def _proposal(self, X):
        means, log_stds, log_weights = self._q(X)
        return means, log_stds + math.log(PROPOSAL_WIDENING), log_weights

    def _encode(self, X):
        if isinstance(self.encoder_, MixtureEncoder):
            return self.encoder_.mean(X)
        return self.encoder_(X)[0]
