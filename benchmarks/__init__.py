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
``refine``
    Diagnostic: MAPA's second phase budget by budget (KL, noise scale).

Results (markdown tables, CSV of raw values, PNG plots) go to
``benchmarks/results/`` (``benchmarks/results/quick/`` with ``--quick``).
"""
