"""IWAEDensity: the importance-weighted autoencoder of Burda et al. as a density estimator."""

from numbers import Integral

from sklearn.utils._param_validation import Interval, StrOptions

from ._amortized import AmortizedDensity
from ._base import fill_doc
from ._objectives import iwae_bound


@fill_doc
class IWAEDensity(AmortizedDensity):
    """Importance-weighted autoencoder density estimator.

    Trains a Gaussian decoder and a Gaussian encoder jointly on the k-sample
    importance-weighted bound (Burda, Grosse & Salakhutdinov, 2016). The
    encoder gradient is the doubly-reparameterised estimator (DReG; Tucker
    et al., 2019) by default, whose variance does not grow with ``k``.

    Parameters
    ----------
    k : int, default=10
        Importance samples per row in the training bound.
    gradient : {'dreg', 'iwae'}, default='dreg'
        Encoder gradient estimator: doubly-reparameterised, or the plain
        gradient of the bound.
%(common_parameters)s

    Attributes
    ----------
%(common_attributes)s
    encoder_ : torch.nn.Module
        The inference network q(z | x); ``transform`` returns its mean.

    See Also
    --------
    VAEDensity : The single-sample ELBO.
    MAPADensity : Decoder-only training with a fixed, data-derived posterior.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa import IWAEDensity
    >>> X = np.random.RandomState(0).normal(size=(200, 2))
    >>> est = IWAEDensity(n_components=1, k=5, max_iter=20, random_state=0).fit(X)
    >>> round(float(est.score(X)), 1) < 0
    True
    """

    _parameter_constraints = {
        **AmortizedDensity._parameter_constraints,
        "k": [Interval(Integral, 1, None, closed="left")],
        "gradient": [StrOptions({"dreg", "iwae"})],
    }

    def __init__(
        self,
        *,
        k=10,
        gradient="dreg",
        n_components=2,
        hidden_layer_sizes=(64, 64),
        activation="tanh",
        batch_size=128,
        learning_rate_init=1e-3,
        max_iter=200,
        tol=1e-4,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=10,
        warm_start=False,
        score_method="auto",
        n_eval_samples=1024,
        random_state=None,
        verbose=0,
        device="auto",
        dtype="auto",
    ):
        super().__init__(
            n_components=n_components,
            hidden_layer_sizes=hidden_layer_sizes,
            activation=activation,
            batch_size=batch_size,
            learning_rate_init=learning_rate_init,
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
            dtype=dtype,
        )
        self.k = k
        self.gradient = gradient

    def _row_bound(self, x, generator):
        eps = self._noise((self.k, x.shape[0], self.n_components), generator)
        return iwae_bound(x, self.encoder_, self.decoder_, eps, self.gradient)
