"""Benchmarks of skmapa's estimators: ``python -m benchmarks [--quick] [--suite NAME]``.

Suites (see ``benchmarks/README.md``):

``density``
    Held-out KL(true || model) on the synthetic sets for MAPA, VAE, IWAE and
    cross-validated KernelDensity and GaussianMixture, with the fit cost.
``curves``
    KL against training cost (row-passes, wall time) for the deep estimators.
``scale``
    MAPADensity fit time and peak memory against N, time per epoch against
    N, and score_samples throughput, memory and accuracy.
``related``
    LiBI and the recursive mixture encoder next to MAPA, VAE and IWAE:
    held-out KL, aggregate posterior, inference and amortization gaps.
``digits``
    Real 64-D data (``load_digits``, dequantised): 5-fold held-out
    log-likelihood of the three estimators, KDE and GMM; MAPA's kernel.
``parallel``
    GridSearchCV with ``n_jobs=2`` against ``n_jobs=1``.
``refine``
    Diagnostic: MAPA's second phase budget by budget (KL, noise scale).
``zoo``
    Every kind of set (scikit-learn's toy sets, the synthetic sets, curves
    and surfaces in 10-50 dimensions, iris, digits): held-out
    log-likelihood, KL where the density is exact, training FLOPs; a
    gallery of the 2-D sets.

Results (markdown tables, CSV of raw values, PNG plots) go to
``benchmarks/results/`` (``benchmarks/results/quick/`` with ``--quick``).
"""
