"""VAEDensity: the variational autoencoder of Kingma & Welling as a density estimator."""

from ._amortized import AmortizedDensity, fill_amortized_doc
from ._base import fill_doc
from ._objectives import elbo, mixture_elbo


@fill_doc
@fill_amortized_doc
class VAEDensity(AmortizedDensity):
    """Variational autoencoder density estimator.

    Trains a Gaussian decoder and a Gaussian encoder jointly on the
    single-sample reparameterised ELBO with analytic KL (Kingma & Welling,
    2014). ``score_samples`` estimates log p(x) itself, not the ELBO.

    Two variants from the literature are options: ``training='libi'`` fits
    the decoder by maximum likelihood before the encoder (Yacoby, Pan &
    Doshi-Velez), and ``encoder='recursive'`` makes q(z | x) a Gaussian
    mixture grown one component at a time (Kim & Pavlovic, 2020), trained on
    the mixture's ELBO (stratified over its components).

    Parameters
    ----------
%(amortized_parameters)s
%(common_parameters)s

    Attributes
    ----------
%(common_attributes)s
%(amortized_attributes)s

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

    Likelihood before inference, and a three-component mixture encoder:

    >>> libi = VAEDensity(n_components=1, training="libi", max_iter=10,
    ...                   random_state=0).fit(X)
    >>> mix = VAEDensity(n_components=1, encoder="recursive",
    ...                  n_mixture_components=3, max_iter=10,
    ...                  random_state=0).fit(X)
    >>> len(mix.encoder_.heads), mix.transform(X[:2]).shape
    (3, (2, 1))
    """

    def _gaussian_bound(self, x, generator, encoder, decoder):
        eps = self._noise((x.shape[0], self.n_components), generator)
        return elbo(x, encoder, decoder, eps)

    def _mixture_bound(self, x, generator, mixture, decoder):
        eps = self._noise((1, *mixture[0].shape), generator)
        return mixture_elbo(x, decoder, *mixture, eps)
