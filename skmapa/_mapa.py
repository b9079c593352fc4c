"""MAPA: the model-agnostic posterior approximation and what is built from it.

Everything here depends on the data alone (plus the fitted decoder where a
function says so): neighbour search, the MAPA weights, the neighbour
statistics of the decoder-only bound, and the a-priori code initialisation.
Memory is O(N k): no N x N matrix is ever formed.
"""

import math
import warnings

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import logsumexp, ndtri
from sklearn.manifold import spectral_embedding
from sklearn.neighbors import NearestNeighbors

from ._linear import probabilistic_pca
from ._scoring import decoder_jacobian
from ._utils import weighted_mean_scale

#: Smallest bandwidth, in standardized units (duplicated rows give 0 distances).
MIN_BANDWIDTH = 1e-3
#: Rows used to compute the spectral initialisation of the codes.
INIT_SUBSAMPLE = 4000
#: The Laplace widths of the atoms are widened by this factor in proposals:
#: the diagonal Laplace approximation misses curved and correlated
#: posteriors (2-D latent on a curve: error vs quadrature 0.048 nats at 1x,
#: 0.041 at 2x, 1024 draws).
PROPOSAL_WIDENING = 2.0
#: Optimizer steps of the short phase-1 run that scores each candidate
#: initialisation of the codes. 200 steps favoured the PCA codes, whose
#: decoder starts at probabilistic PCA, over codes whose linear start is
#: poor: on two concentric circles (1-D latent) the per-component angle codes
#: were behind PCA after 200 steps (bound 6.23 vs 6.14) and far ahead after
#: 400 (5.39 vs 6.14) and at the end (held-out -1.90 vs -2.63 nats per row).
INIT_TRIAL_STEPS = 400
#: ... and on more than ``INIT_TRIAL_LARGE_ROWS`` atoms this many. On large
#: data the bound after a short trial did not tell a folded start from a
#: good one: a code moves only when its atom is in a minibatch, and the
#: 2-D angle codes (which fold an open curve) led the spectral ones for a
#: while. Measured on the spiral (seeds 0-2; spectral is right): at
#: 3*10^5 rows the angle led after 400 and 800 steps and trailed after 1600
#: (held-out KL 0.0327/0.0024/0.0252 with 400 steps, 0.0073/0.0043/0.0063
#: with 1600); at 10^4 rows the spectral codes led after 400 and 1600 steps
#: but the angle led after 632 on two seeds (KL 0.076, 0.082 against 0.010,
#: 0.011 with 1600). Up to 6400 rows 400 steps chose well (the ``density``
#: suite), and 150-row fits stay fast.
INIT_TRIAL_LARGE_ROWS = 6400
INIT_TRIAL_LARGE_STEPS = 1600
#: Components of a disconnected neighbour graph chained greedily, each next
#: to the nearest (more are ordered along the main axis of their centroids).
MAX_CHAINED = 64
#: Random rotations of the prior-matching projection at initialisation.
INIT_ROTATIONS = 30
#: Rows whose neighbourhoods ``local_residual`` fits (evenly spaced).
LOCAL_RESIDUAL_ROWS = 1000


def fit_neighbors(X):
    """A k-NN index over the training rows (a tree, never an N x N matrix)."""
    return NearestNeighbors(algorithm="auto").fit(X)


def kneighbors(index, X, n_neighbors):
    """Distances and indices of the ``n_neighbors`` nearest training rows."""
    dist, idx = index.kneighbors(X, n_neighbors=n_neighbors)
    return dist, idx


def kneighbors_without_self(index, X, n_neighbors):
    """The ``n_neighbors`` nearest training rows of each training row, itself left out.

    ``X`` are the rows the index was fitted on, in the same order. One more
    neighbour is queried and the row's own index dropped; where the row is
    not among them (more exact duplicates than neighbours, ties broken
    against it) the farthest one is dropped instead, so every row keeps
    ``min(n_neighbors, n - 1)`` neighbours, none of them itself (a duplicate
    of it, at distance 0, may stay).
    """
    n = X.shape[0]
    k = min(int(n_neighbors), n - 1)
    if k < 1:
        raise ValueError("leaving each row out needs at least two rows")
    dist, idx = index.kneighbors(X, n_neighbors=k + 1)
    drop = idx == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return dist[keep].reshape(n, k), idx[keep].reshape(n, k)


def auto_bandwidth(distances, self_included=True):
    """Mean distance to the k nearest neighbours, the zero self-distance excluded.

    Floored at ``MIN_BANDWIDTH`` so that duplicated rows cannot make it 0.
    """
    d = distances[:, 1:] if self_included and distances.shape[1] > 1 else distances
    value = float(np.mean(d)) if d.size else 0.0
    return max(value, MIN_BANDWIDTH)


def perplexity_bandwidths(distances, perplexity, n_iter=64):
    """Per-row bandwidths whose MAPA posterior has ``perplexity`` effective atoms.

    As t-SNE calibrates its kernel: for each row, the bandwidth ``tau_n`` for
    which ``exp(H(q(. | x_n)))``, the effective number of neighbours the
    softmax spreads its mass over, equals ``perplexity`` (bisection on
    ``log tau_n``, all rows at once). The effective number grows from 1 to
    the number of neighbours with the bandwidth, so the target is met
    whatever the spacing of a row's neighbours; rows whose neighbours are all
    at the same distance get the largest bandwidth tried. Floored at
    ``MIN_BANDWIDTH``.
    """
    d2 = np.asarray(distances, dtype=np.float64) ** 2
    n, k = d2.shape
    target = math.log(min(max(float(perplexity), 1.0), k))
    scale = np.sqrt(np.maximum(d2.mean(1), MIN_BANDWIDTH ** 2))
    lo = np.log(np.full(n, MIN_BANDWIDTH))
    hi = np.log(scale) + 10.0
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        logits = -0.5 * d2 / np.exp(2 * mid)[:, None]
        log_q = logits - logsumexp(logits, axis=1, keepdims=True)
        entropy = -np.sum(np.exp(log_q) * log_q, axis=1)
        too_wide = entropy > target
        hi = np.where(too_wide, mid, hi)
        lo = np.where(too_wide, lo, mid)
    return np.exp(0.5 * (lo + hi))


def mapa_log_weights(distances, idx, bandwidth, atom_log_prior):
    """log q(m | x) over each row's neighbours ``m``.

    ``q(m | x) ∝ pi_m exp(-||x - x_m||^2 / (2 bandwidth^2))``, where ``pi_m``
    is the atom's weight in the empirical prior (uniform without
    sample_weight). ``bandwidth`` is one number or one per row.
    """
    bandwidth = np.asarray(bandwidth, dtype=np.float64)
    if bandwidth.ndim == 1:
        bandwidth = bandwidth[:, None]
    logits = -0.5 * (distances / bandwidth) ** 2 + atom_log_prior[idx]
    return logits - logsumexp(logits, axis=1, keepdims=True)


def neighbour_statistics(X, idx, log_q, row_weights):
    """The statistics of the decoder-only bound, regrouped by atom.

    For ``Q[n, m] = w_n q(m | x_n)``:
    ``wbar_m = sum_n Q[n, m]``, ``xbar_m = sum_n Q[n, m] x_n / wbar_m`` and
    ``spread_j = sum_{n, m} Q[n, m] (x_nj - xbar_mj)^2``.
    Atoms that are nobody's neighbour get ``wbar = 0`` and ``xbar = x_m``.
    """
    n, k = idx.shape
    M = X.shape[0]
    q = np.exp(log_q) * row_weights[:, None]
    Q = sparse.csr_matrix((q.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, M))
    wbar = np.asarray(Q.sum(axis=0)).ravel()
    num = np.asarray(Q.T @ X)
    xbar = X.copy()
    has = wbar > 0
    xbar[has] = num[has] / wbar[has, None]
    spread = np.zeros(X.shape[1])
    for start in range(0, n, 65536):
        sl = slice(start, start + 65536)
        diff = X[sl, None, :] - xbar[idx[sl]]
        spread += np.einsum("nk,nkj->j", q[sl], diff * diff)
    return wbar, xbar, spread


def weighted_normal_quantiles(order_values, weights):
    """N(0, 1) quantiles at the weighted mid-ranks of ``order_values``.

    ``scipy.special.ndtri`` is ``scipy.stats.norm.ppf`` without the
    distribution machinery around it (the same values, bit for bit): the
    codes are re-matched with it after every epoch, and on 150 rows (two
    steps per epoch) ``norm.ppf``'s ~180 us per call were 8% of a fit.
    """
    return ndtri(np.clip(_mid_ranks(order_values, weights), 1e-12, 1 - 1e-12))


def match_prior(codes, weights, rng, n_rotations):
    """Move codes towards N(0, I) jointly, keeping their arrangement.

    Iterative distribution transfer (Pitié et al., 2007): in a random
    orthonormal basis, replace each coordinate by the N(0, 1) quantile of its
    weighted rank. In one dimension one step is the exact rank transform; in
    more, repeated random rotations match the joint distribution, not only the
    marginals, at O(N log N) per rotation.
    """
    codes = np.array(codes, dtype=np.float64, copy=True)
    d = codes.shape[1]
    if d == 1:
        codes[:, 0] = weighted_normal_quantiles(codes[:, 0], weights)
        return codes
    for _ in range(n_rotations):
        basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
        proj = codes @ basis
        for j in range(d):
            proj[:, j] = weighted_normal_quantiles(proj[:, j], weights)
        codes = proj @ basis.T
    return codes


def local_residual(X, idx, n_components, weights, max_rows=LOCAL_RESIDUAL_ROWS):
    """The variance of the neighbourhoods off a local fit of ``n_components``
    dimensions: for up to ``max_rows`` evenly spaced rows, the principal
    components of the row's neighbours ``X[idx[row]]``; the variance left
    after the first ``n_components``, per remaining direction, averaged over
    the rows with ``weights``. Small where the rows lie near a densely
    sampled ``n_components``-dimensional manifold; it grows with the noise
    and with the curvature the neighbourhoods span. None where no direction
    is left (``n_components >= n_features``) or a neighbourhood is too small
    to fit (``n_neighbors <= n_components + 1``)."""
    n, n_features = X.shape
    k = idx.shape[1]
    if n_components >= n_features or k <= n_components + 1:
        return None
    rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).astype(int))
    nb = X[idx[rows]]
    nb = nb - nb.mean(axis=1, keepdims=True)
    sq = np.linalg.svd(nb, compute_uv=False) ** 2
    # the fitted directions take some of the noise: k - 1 - n_components
    # degrees of freedom are left per remaining direction
    left = ((sq.sum(axis=1) - sq[:, :n_components].sum(axis=1))
            / ((k - 1 - n_components) * (n_features - n_components)))
    return float(np.average(left, weights=weights[rows]))


def _weighted_standardized(X, weights):
    """``X`` centred and scaled to unit weighted variance per column; columns
    constant under the weights are dropped."""
    mean, scale, varies = weighted_mean_scale(X, weights)
    return (X[:, varies] - mean[varies]) / scale[varies]


def _noise_share(X, weights, n_components):
    """The variance that probabilistic PCA with ``n_components`` leaves to
    its noise, per direction, in units of standardized ``X``."""
    return float(np.mean(probabilistic_pca(X, weights, n_components).noise_var))


def gaussian_noise_share(n_rows, n_features, n_components):
    """``_noise_share`` of ``n_rows`` rows of standardized Gaussian noise in
    ``n_features`` dimensions (one draw of a fixed seed): below 1 by the
    sampling spread of the eigenvalues, which the first ``n_components``
    take (0.90 for 50 rows in 50 dimensions and two components, 0.95 for
    700 rows in 10)."""
    Z = np.random.default_rng(0).standard_normal((n_rows, n_features))
    ones = np.ones(n_rows)
    return _noise_share(_weighted_standardized(Z, ones), ones, n_components)


def structure_within_pieces(X, weights, n_components, n_neighbors):
    """How little low-dimensional structure the rows ``X`` (standardized
    with ``weights``) have, within each piece (connected component) of their
    ``n_neighbors``-NN graph, each piece standardized on its own:
    ``(noise, residual)``, weighted means over the
    pieces. ``noise`` is the share of the variance probabilistic PCA with
    ``n_components`` leaves to its noise, relative to the share it leaves on
    Gaussian noise of the piece's size (``gaussian_noise_share``), about 1
    where the piece has no linear structure; ``residual`` is the piece's
    ``local_residual``. On a connected graph these are the statistics of all
    the rows, with the noise share corrected for the sample size. Pieces too
    small to fit (at most ``n_components + 1`` rows) are left out; None
    where none is left or ``n_components`` leaves no direction."""
    _, idx = kneighbors(fit_neighbors(X), X, min(n_neighbors, X.shape[0]))
    n_pieces, labels = graph_components(idx)
    stats, sizes = [], []
    for label in range(n_pieces):
        rows = labels == label
        Xp, wp = X[rows], weights[rows]
        if Xp.shape[0] <= n_components + 1:
            continue
        Xp = _weighted_standardized(Xp, wp)
        if Xp.shape[1] <= n_components:
            continue
        # one piece: its own standardization moves no distance of X's
        # (standardized with the same weights), nor its neighbours
        idx_p = idx if n_pieces == 1 else kneighbors(
            fit_neighbors(Xp), Xp, min(n_neighbors, Xp.shape[0]))[1]
        residual = local_residual(Xp, idx_p, n_components, wp)
        if residual is None:
            continue
        noise = (_noise_share(Xp, wp, n_components)
                 / gaussian_noise_share(Xp.shape[0], Xp.shape[1], n_components))
        stats.append((noise, residual))
        sizes.append(wp.sum())
    if not stats:
        return None
    noise, residual = np.average(np.array(stats), axis=0, weights=sizes)
    return float(noise), float(residual)


def _knn_matrix(idx):
    """The directed k-NN graph as a sparse 0/1 matrix (row i -> its neighbours)."""
    n, k = idx.shape
    return sparse.csr_matrix((np.ones(n * k), idx.ravel(), np.arange(0, n * k + 1, k)),
                             shape=(n, n))


def graph_components(idx):
    """Connected components of the symmetrised k-NN graph: (count, label per row)."""
    return connected_components(_knn_matrix(idx), directed=True, connection="weak")


def mutual_pieces(idx, min_rows):
    """Pieces of the mutual k-NN graph, or None where it has fewer than two
    pieces of at least ``min_rows`` rows.

    The mutual graph keeps an edge where each row is among the other's
    neighbours. Two pieces that touch at a few rows (two concentric circles
    whose noisy rows reach across) are one component of the k-NN graph,
    whose first eigenvectors then mostly tell the pieces apart, but the
    edges across are rarely mutual. Rows in smaller pieces (isolated rows)
    join the piece of their nearest neighbour in a large one. Returns one
    label per row, 0 to the number of large pieces - 1.
    """
    A = _knn_matrix(idx)
    _, labels = connected_components(A.multiply(A.T), directed=False)
    sizes = np.bincount(labels)
    large = sizes >= min_rows
    if large.sum() < 2:
        return None
    relabel = np.full(len(sizes), -1)
    relabel[large] = np.arange(large.sum())
    labels = relabel[labels]
    while (labels < 0).any():
        left = np.flatnonzero(labels < 0)
        neighbour = labels[idx[left]]
        placed = (neighbour >= 0).any(1)
        if not placed.any():  # no neighbour anywhere in a large piece
            labels[left] = np.argmax(sizes[large])
            break
        first = np.argmax(neighbour >= 0, axis=1)
        labels[left[placed]] = neighbour[placed, first[placed]]
    return labels


def graph_codes(X, idx, log_q, n_components, rng, within="spectral"):
    """Codes from the MAPA graph, connected or not.

    On a connected graph, ``within`` ('spectral' or, for one latent
    dimension, 'angle') of the whole graph. On a disconnected one the first
    eigenvectors of the Laplacian are component indicators, not coordinates:
    each connected component is embedded on its own and the components are
    laid out side by side (:func:`component_codes`).
    """
    n_comp, labels = graph_components(idx)
    if n_comp == 1:
        return _WITHIN[within](X, idx, log_q, n_components, rng)
    return component_codes(X, idx, log_q, labels, n_components, rng, within)


def component_codes(X, idx, log_q, labels, n_components, rng, within="spectral",
                    weights=None):
    """Codes for a disconnected graph: one interval of the first axis per component.

    The components are chained, each next to the nearest one not yet placed
    (starting from one end of the data's main axis), and each gets its own
    interval of the N(0, 1) quantiles on the first code coordinate, of prior
    mass equal to its share of the rows' ``weights``. Inside a component
    the codes are its own ``within`` embedding (rank-transformed, so they
    fill the interval), turned so that each component's first end faces the
    end of the previous one; further coordinates are the component's own
    further embedding coordinates, rank-transformed to N(0, 1).
    """
    n = X.shape[0]
    weights = np.ones(n) if weights is None else weights / weights.sum()
    n_comp = labels.max() + 1
    members = np.split(np.argsort(labels, kind="stable"),
                       np.cumsum(np.bincount(labels, minlength=n_comp))[:-1])
    mass = np.array([weights[rows].sum() for rows in members]) / weights.sum()
    centroids = np.array([weights[rows] @ X[rows] / weights[rows].sum() for rows in members])
    order = _chain(centroids, mass)
    codes = np.empty((n, n_components))
    previous_end = None
    below = 0.0  # prior mass of the components already placed
    for c in order:
        rows = members[c]
        inner = _component_embedding(X, idx, log_q, rows, n_components, rng, within)
        u = _mid_ranks(inner[:, 0], weights[rows])
        ends = [X[rows[u <= max(0.1, u.min())]].mean(0),
                X[rows[u >= min(0.9, u.max())]].mean(0)]
        # the first end faces the previous component (the first component:
        # its second end faces the next one)
        if previous_end is None:
            target = centroids[order[1]]
            flip = np.sum((ends[0] - target) ** 2) < np.sum((ends[1] - target) ** 2)
        else:
            flip = np.sum((ends[1] - previous_end) ** 2) < np.sum((ends[0] - previous_end) ** 2)
        if flip:
            u, ends = 1.0 - u, ends[::-1]
        previous_end = ends[1]
        codes[rows, 0] = ndtri(np.clip(below + mass[c] * u, 1e-12, 1 - 1e-12))
        below += mass[c]
        for j in range(1, n_components):
            codes[rows, j] = weighted_normal_quantiles(inner[:, j], weights[rows])
    return codes + 1e-9 * rng.standard_normal(codes.shape)


def _chain(centroids, w):
    """An order of the components: from one end of the centroids' main axis
    (weighted by ``w``), each next the nearest not yet placed (beyond
    ``MAX_CHAINED`` components, whose greedy chain would cost O(C^2): their
    order along that axis)."""
    centred = centroids - w @ centroids
    axis = np.linalg.svd(centred * np.sqrt(w)[:, None], full_matrices=False)[2][0]
    if len(centroids) > MAX_CHAINED:
        return [int(c) for c in np.argsort(centred @ axis, kind="stable")]
    order = [int(np.argmin(centred @ axis))]
    left = set(range(len(centroids))) - set(order)
    while left:
        last = centroids[order[-1]]
        nxt = min(left, key=lambda c: np.sum((centroids[c] - last) ** 2))
        order.append(nxt)
        left.remove(nxt)
    return order


def _mid_ranks(values, weights):
    """Weighted mid-ranks of ``values`` in (0, 1)."""
    order = np.argsort(values, kind="stable")
    w = weights[order] / weights.sum()
    out = np.empty(len(values))
    out[order] = np.cumsum(w) - 0.5 * w
    return out


def _component_embedding(X, idx, log_q, rows, n_components, rng, within):
    """``within`` embedding of one connected component (its rows' neighbours
    are in it); PCA for components too small to embed."""
    if len(rows) < n_components + 3:
        return pca_codes(X[rows], np.ones(len(rows)), n_components, rng)
    local = np.zeros(X.shape[0], dtype=idx.dtype)
    local[rows] = np.arange(len(rows))
    member = np.zeros(X.shape[0], dtype=bool)
    member[rows] = True
    # neighbours outside the component (pieces of a connected graph,
    # mutual_pieces) are dropped: weight 0 on an edge to the row itself
    inside = member[idx[rows]]
    local_idx = np.where(inside, local[idx[rows]], np.arange(len(rows))[:, None])
    local_log_q = np.where(inside, log_q[rows], -np.inf)
    return _WITHIN[within](X[rows], local_idx, local_log_q, n_components, rng)


def spectral_codes(X, idx, log_q, n_components, rng):
    """Codes from the spectral embedding of the symmetrised MAPA graph.

    Rows beyond ``INIT_SUBSAMPLE`` are embedded on a random subsample (with its
    own k-NN graph, laid out per component if it is disconnected) and the rest
    get the MAPA-weighted mean of their neighbours' codes in that subsample, so
    the cost stays linear in N.
    """
    n, k = idx.shape
    if n > INIT_SUBSAMPLE:
        sub = np.sort(rng.choice(n, INIT_SUBSAMPLE, replace=False))
        index = fit_neighbors(X[sub])
        dist, sidx = kneighbors(index, X[sub], k)
        bw = auto_bandwidth(dist)
        slog_q = mapa_log_weights(dist, sidx, bw, np.zeros(len(sub)))
        sub_codes = graph_codes(X[sub], sidx, slog_q, n_components, rng)
        dist, nidx = kneighbors(index, X, k)
        w = np.exp(mapa_log_weights(dist, nidx, bw, np.zeros(len(sub))))
        return np.einsum("nk,nkd->nd", w, sub_codes[nidx])
    A = sparse.csr_matrix(
        (np.exp(log_q).ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n)
    )
    A = 0.5 * (A + A.T)
    seed = int(rng.randint(np.iinfo(np.int32).max))
    n_eig = min(n_components, n - 2) if n > 2 else 1
    try:
        with warnings.catch_warnings():
            # callers lay disconnected graphs out per component
            # (graph_codes); scikit-learn's notice is not for our users
            warnings.filterwarnings("ignore", message="Graph is not fully connected")
            # tiny graphs: scipy's dense solver is the right one, no notice needed
            warnings.filterwarnings("ignore", message="k >= N")
            emb = spectral_embedding(A, n_components=max(n_eig, 1), random_state=seed,
                                     drop_first=True, norm_laplacian=True)
    except Exception:  # degenerate graphs (tiny data)
        emb = rng.standard_normal((n, n_components))
    if emb.shape[1] < n_components:
        extra = 1e-3 * rng.standard_normal((n, n_components - emb.shape[1]))
        emb = np.hstack([emb, extra])
    emb = emb - emb.mean(0)
    sd = emb.std(0)
    emb = emb / np.where(sd > 0, sd, 1.0)
    # break exact ties (duplicated rows) so ranks are well defined
    return emb + 1e-9 * rng.standard_normal(emb.shape)


def first_coordinate_codes(first, n_components, rng):
    """Codes with ``first`` (one value per row) as their first coordinate and
    the other ``n_components - 1`` drawn from N(0, 1).

    A start for more latent dimensions than the neighbour graph identifies:
    on a curve (two moons with two latent dimensions) a graph embedding's
    second coordinate is a second harmonic along the curve, not a coordinate
    across it, and decoding a 2-D prior folded onto the curve gives a lumpy
    density. Codes that carry nothing in their other coordinates start the
    decoder as the curve's model and leave those coordinates for the second
    phase to use.
    """
    first = np.asarray(first, dtype=np.float64).reshape(-1, 1)
    return np.hstack([first, rng.standard_normal((len(first), n_components - 1))])


def pca_codes(X, weights, n_components, rng):
    """Codes from the top principal components of the (weighted) rows.

    Where the neighbour graph carries no single manifold coordinate (several
    connected components, clusters, noise-dominated distances) the linear
    projection still orders the rows; it is one candidate start.
    """
    w = weights / weights.sum()
    Xc = X - w @ X
    evals, evecs = np.linalg.eigh((Xc * w[:, None]).T @ Xc)
    d = min(n_components, X.shape[1])
    codes = Xc @ evecs[:, ::-1][:, :d]
    if d < n_components:
        codes = np.hstack([codes, 1e-3 * rng.standard_normal((X.shape[0], n_components - d))])
    return codes + 1e-9 * rng.standard_normal(codes.shape)


def angle_codes(X, idx, log_q, n_components, rng):
    """1-D codes from the angle of the 2-D spectral embedding.

    A 1-D spectral embedding folds a closed curve onto itself (the Fiedler
    vector of a loop is cos(theta)); the angle of the first two coordinates
    unrolls it, at the price of one cut. ``n_components`` must be 1.
    """
    return embedding_angle(spectral_codes(X, idx, log_q, 2, rng))


def embedding_angle(embedding):
    """The angle of an embedding's first two coordinates, as a column."""
    return np.arctan2(embedding[:, 1], embedding[:, 0])[:, None]


#: Embeddings of a connected graph, by name (see graph_codes).
_WITHIN = {"spectral": spectral_codes, "angle": angle_codes}


def laplace_log_scales(decoder, codes):
    """Per-atom log std of a Laplace approximation to p(z | x = f(z_m)).

    Diagonal of the posterior precision ``I + J^T diag(1/sigma^2) J`` at each
    atom, with ``J`` the decoder's Jacobian (one forward-mode pass per latent
    dimension). These widths scale the MAPA mixture used as a proposal.
    """
    inv_var = 1.0 / decoder.scale.detach() ** 2
    out = []
    with torch.no_grad():
        for chunk in codes.split(65536):
            _, J = decoder_jacobian(decoder, chunk)  # (n, D, d)
            prec = 1.0 + (J * J * inv_var[:, None]).sum(1)
            out.append(-0.5 * torch.log(prec))
    return torch.cat(out)
