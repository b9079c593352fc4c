"""VAEDensity: the variational autoencoder of Kingma & Welling as a density estimator."""

from ._amortized import AmortizedDensity
from ._base import fill_doc
from ._objectives import elbo


@fill_doc
class VAEDensity(AmortizedDensity):
    """Variational autoencoder density estimator.

    Trains a Gaussian decoder and a Gaussian encoder jointly on the
    single-sample reparameterised ELBO with analytic KL (Kingma & Welling,
    2014). ``score_samples`` estimates log p(x) itself, not the ELBO.

    Parameters
    ----------
%(common_parameters)s

    Attributes
    ----------
%(common_attributes)s
    encoder_ : torch.nn.Module
        The inference network q(z | x); ``transform`` returns its mean.

    See Also
    --------
    IWAEDensity : The importance-weighted bound.
    MAPADensity : Decoder-only training with a fixed, data-derived posterior.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa import VAEDensity
    >>> X = np.random.RandomState(0).normal(size=(200, 2))
    >>> est = VAEDensity(n_components=1, max_iter=20, random_state=0).fit(X)
    >>> est.score_samples(X[:3]).shape
    (3,)
    >>> est.transform(X[:3]).shape
    (3, 1)
    """

    def _row_bound(self, x, generator):
        eps = self._noise((x.shape[0], self.n_components), generator)
        return elbo(x, self.encoder_, self.decoder_, eps)
