"""Input validation, bad parameters, hard data, and inputs never modified.

Every estimator exported by skmapa is checked; each bad input must raise an
error whose message names the problem (and the parameter, for parameters).
"""

import warnings
from numbers import Integral

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval

import skmapa
from skmapa._amortized import AmortizedDensity
from skmapa._base import BaseDeepDensity

ESTIMATORS = [
    obj
    for obj in (getattr(skmapa, name) for name in skmapa.__all__)
    if isinstance(obj, type) and issubclass(obj, BaseDeepDensity)
]


def make(cls, **params):
    """A tiny, fast instance; estimator-specific extra epochs ('*_iter') set to 1."""
    kw = dict(hidden_layer_sizes=(8,), max_iter=2, n_eval_samples=32, batch_size=32,
              random_state=0)
    kw.update({p: 1 for p in cls().get_params() if p.endswith("_iter") and p != "max_iter"})
    kw.update(params)
    return cls(**kw)


@pytest.fixture(scope="module")
def X():
    rng = np.random.RandomState(0)
    return rng.randn(60, 3) * [1.0, 3.0, 0.5] + [0.0, 2.0, -1.0]


@pytest.fixture(params=ESTIMATORS, ids=lambda c: c.__name__)
def Estimator(request):
    return request.param


@pytest.fixture(scope="module")
def fitted_models(X):
    return {cls: make(cls, n_components=2).fit(X) for cls in ESTIMATORS}


@pytest.fixture
def fitted(Estimator, fitted_models):
    return fitted_models[Estimator]


def _with(X, row, col, value):
    X = np.array(X, dtype=np.float64)
    X[row, col] = value
    return X


# ----------------------------------------------------------------------
# bad X at fit time
# ----------------------------------------------------------------------
def _bad_fit_inputs():
    X = np.random.RandomState(1).randn(20, 3)
    cases = {
        "nan": (_with(X, 3, 1, np.nan), ValueError, "Input X contains NaN"),
        "+inf": (_with(X, 0, 0, np.inf), ValueError, "Input X contains infinity"),
        "-inf": (_with(X, 5, 2, -np.inf), ValueError, "Input X contains infinity"),
        "empty": (np.empty((0, 3)), ValueError, r"0 sample\(s\)"),
        "no features": (np.empty((20, 0)), ValueError, r"0 feature\(s\)"),
        "single row": (X[:1], ValueError, r"1 sample\(s\).*minimum of 2"),
        "1-D": (X[:, 0], ValueError, "Expected 2D array, got 1D array"),
        "3-D": (X.reshape(20, 3, 1), ValueError, "dim 3"),
        "scalar": (np.float64(3.0), ValueError, "Expected 2D array, got scalar"),
        "None": (None, ValueError, "Expected 2D array"),
        "strings": (np.array([["a", "b"], ["c", "d"], ["e", "f"]]), ValueError,
                    "could not convert string to float"),
        "object strings": (np.array([[1.0, "b"], [2.0, "d"], [3.0, "x"]], dtype=object),
                           ValueError, "could not convert string to float"),
        "ragged": ([[1.0, 2.0], [3.0]], ValueError, "inhomogeneous"),
        "complex": (X + 1j, ValueError, "Complex data not supported"),
        "csr": (sp.csr_matrix(X), TypeError, "Sparse data was passed for X"),
        "csc": (sp.csc_matrix(X), TypeError, "Sparse data was passed for X"),
        "coo": (sp.coo_matrix(X), TypeError, "Sparse data was passed for X"),
        "sparse array": (sp.csr_array(X), TypeError, "Sparse data was passed for X"),
    }
    return cases


BAD_FIT = _bad_fit_inputs()


@pytest.mark.parametrize("case", list(BAD_FIT))
def test_bad_X_at_fit(Estimator, case):
    X, error, match = BAD_FIT[case]
    with pytest.raises(error, match=match):
        make(Estimator).fit(X)


def test_bad_pandas_input_at_fit(Estimator):
    pd = pytest.importorskip("pandas")
    n = 15
    cases = [
        (pd.DataFrame({"a": pd.array([1, None, 3] * 5, dtype="Int64"), "b": np.arange(n)}),
         ValueError, "Input X contains NaN"),
        (pd.DataFrame({"a": list("xyz") * 5, "b": np.arange(n)}), ValueError,
         "could not convert string to float"),
        (pd.DataFrame({"a": pd.Categorical(list("xyz") * 5), "b": np.arange(n)}),
         ValueError, "could not convert string to float"),
        (pd.Series(np.arange(n, dtype=float)), ValueError, "2-dimensional"),
    ]
    for X, error, match in cases:
        with pytest.raises(error, match=match):
            make(Estimator).fit(X)


def _bad_sample_weights():
    return {
        "nan": (np.r_[np.nan, np.ones(59)], ValueError, "sample_weight contains NaN"),
        "inf": (np.r_[np.inf, np.ones(59)], ValueError, "sample_weight contains infinity"),
        "negative": (np.r_[-1.0, np.ones(59)], ValueError, "Negative values.*sample_weight"),
        "all zero": (np.zeros(60), ValueError, "at least one"),
        "wrong length": (np.ones(59), ValueError, r"sample_weight\.shape"),
        "2-D": (np.ones((60, 2)), ValueError, "Sample weights must be 1D"),
        "strings": (np.array(["a"] * 60), ValueError, "could not convert string"),
    }


BAD_WEIGHTS = _bad_sample_weights()


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_sample_weight(Estimator, X, case):
    w, error, match = BAD_WEIGHTS[case]
    with pytest.raises(error, match=match):
        make(Estimator).fit(X, sample_weight=w)


def test_early_stopping_with_too_few_rows(Estimator, X):
    with pytest.raises(ValueError, match="validation_fraction=0.5 leaves too few rows"):
        make(Estimator, early_stopping=True, validation_fraction=0.5).fit(X[:3])


# ----------------------------------------------------------------------
# bad X at score / transform time
# ----------------------------------------------------------------------
SCORING = ["score_samples", "score", "transform"]


def _bad_score_inputs():
    X = np.random.RandomState(2).randn(5, 3)
    return {
        "nan": (_with(X, 0, 0, np.nan), ValueError, "Input X contains NaN"),
        "inf": (_with(X, 1, 2, np.inf), ValueError, "Input X contains infinity"),
        "too few features": (X[:, :2], ValueError,
                             "X has 2 features, but .* is expecting 3 features"),
        "too many features": (np.c_[X, X], ValueError,
                              "X has 6 features, but .* is expecting 3 features"),
        "empty": (np.empty((0, 3)), ValueError, r"0 sample\(s\)"),
        "1-D": (X[0], ValueError, "Expected 2D array, got 1D array"),
        "3-D": (X[:, :, None], ValueError, "dim 3"),
        "strings": (np.array([["a", "b", "c"]]), ValueError, "could not convert string"),
        "complex": (X + 1j, ValueError, "Complex data not supported"),
        "sparse": (sp.csr_matrix(X), TypeError, "Sparse data was passed for X"),
    }


BAD_SCORE = _bad_score_inputs()


@pytest.mark.parametrize("method", SCORING)
@pytest.mark.parametrize("case", list(BAD_SCORE))
def test_bad_X_at_score_and_transform(fitted, method, case):
    X, error, match = BAD_SCORE[case]
    with pytest.raises(error, match=match):
        getattr(fitted, method)(X)


BAD_CODES = {
    "wrong n_components": (np.zeros((4, 3)), "inverse_transform expects 2 columns"),
    "nan": (np.full((2, 2), np.nan), "Input X contains NaN"),
    "inf": (np.array([[np.inf, 0.0]]), "Input X contains infinity"),
    "1-D": (np.zeros(2), "Expected 2D array"),
    "empty": (np.empty((0, 2)), r"0 sample\(s\)"),
}


@pytest.mark.parametrize("case", list(BAD_CODES))
def test_bad_codes_at_inverse_transform(fitted, case):
    Z, match = BAD_CODES[case]
    with pytest.raises(ValueError, match=match):
        fitted.inverse_transform(Z)


@pytest.mark.parametrize("n_samples", [0, -1, 2.5, "3", True, None])
def test_bad_n_samples(fitted, n_samples):
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        fitted.sample(n_samples)


def test_bad_sample_random_state(fitted):
    with pytest.raises(ValueError, match="random_state must be"):
        fitted.sample(2, random_state="seed")


def test_unfitted_estimator(Estimator):
    est = make(Estimator)
    Z = np.zeros((2, 2))
    for call in (lambda: est.score_samples(Z), lambda: est.score(Z),
                 lambda: est.transform(Z), lambda: est.inverse_transform(Z),
                 lambda: est.sample(2)):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            call()


# ----------------------------------------------------------------------
# inputs that are converted
# ----------------------------------------------------------------------
def _converted_inputs(X):
    Xi = np.round(3 * X).astype(np.int64)
    X16 = X.astype(np.float16)
    return {
        "float16": (X16, X16.astype(np.float64)),
        "float32": (X.astype(np.float32), X.astype(np.float32).astype(np.float64)),
        "int64": (Xi, Xi.astype(np.float64)),
        "int8": (Xi.astype(np.int8), Xi.astype(np.float64)),
        "uint8": ((Xi - Xi.min()).astype(np.uint8), (Xi - Xi.min()).astype(np.float64)),
        "bool": (X > 0, (X > 0).astype(np.float64)),
        "numeric object": (X.astype(object), X),
        "list of lists": (X.tolist(), X),
        "Fortran order": (np.asfortranarray(X), X),
        "strided view": (np.repeat(X, 2, axis=1)[:, ::2], X),
    }


@pytest.mark.parametrize(
    "case", ["float16", "float32", "int64", "int8", "uint8", "bool", "numeric object",
             "list of lists", "Fortran order", "strided view"]
)
def test_converted_inputs_give_the_float64_result(Estimator, X, case):
    data, as_float64 = _converted_inputs(X)[case]
    est = make(Estimator).fit(data)
    ref = make(Estimator).fit(as_float64)
    out = est.score_samples(data)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref.score_samples(as_float64), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.transform(data), ref.transform(as_float64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int32])
def test_converted_inputs_at_score_time(fitted, X, dtype):
    data = (X * 2).astype(dtype)
    np.testing.assert_allclose(
        fitted.score_samples(data), fitted.score_samples(data.astype(np.float64)),
        rtol=1e-12, atol=1e-12,
    )
    Z = np.zeros((3, 2), dtype=dtype)
    np.testing.assert_array_equal(fitted.inverse_transform(Z),
                                  fitted.inverse_transform(Z.astype(np.float64)))


# ----------------------------------------------------------------------
# pandas and feature names
# ----------------------------------------------------------------------
def test_feature_names_are_checked_at_score_time(Estimator, X):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    est = make(Estimator).fit(df)
    assert list(est.feature_names_in_) == ["a", "b", "c"]
    expected = est.score_samples(df)
    for method in SCORING:
        for bad, match in [
            (df.rename(columns={"a": "z"}), "Feature names unseen at fit time"),
            (df[["b", "a", "c"]], "must be in the same order"),
            (df.assign(d=1.0), "Feature names unseen at fit time"),
        ]:
            with pytest.raises(ValueError, match="feature names should match"):
                getattr(est, method)(bad)
            with pytest.raises(ValueError, match=match):
                getattr(est, method)(bad)
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        np.testing.assert_array_equal(est.score_samples(X), expected)


def test_pandas_frames_give_the_numpy_result(Estimator, X):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    mixed = pd.DataFrame({"a": np.round(X[:, 0]).astype(int), "b": X[:, 1],
                          "c": pd.array(np.round(X[:, 2]).astype(int), dtype="Int64")})
    est = make(Estimator).fit(X)
    with pytest.warns(UserWarning, match="X has feature names, but"):
        np.testing.assert_array_equal(est.score_samples(df), est.score_samples(X))
    # integer, float and nullable-integer columns are converted
    a = make(Estimator).fit(mixed)
    b = make(Estimator).fit(mixed.to_numpy(dtype=np.float64))
    np.testing.assert_allclose(a.score_samples(mixed),
                               b.score_samples(mixed.to_numpy(dtype=np.float64)), rtol=1e-12)
    # non-string column names are not feature names
    assert not hasattr(make(Estimator).fit(pd.DataFrame(X)), "feature_names_in_")


# ----------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------
BAD_PARAMS = {
    "n_components=0": ({"n_components": 0}, "n_components"),
    "n_components=-1": ({"n_components": -1}, "n_components"),
    "n_components=1.5": ({"n_components": 1.5}, "n_components"),
    "n_components='2'": ({"n_components": "2"}, "n_components"),
    "n_components=None": ({"n_components": None}, "n_components"),
    "hidden_layer_sizes=(0,)": ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"),
    "hidden_layer_sizes=(-3,)": ({"hidden_layer_sizes": (-3,)}, "hidden_layer_sizes"),
    "hidden_layer_sizes=(8.5,)": ({"hidden_layer_sizes": (8.5,)}, "hidden_layer_sizes"),
    "hidden_layer_sizes=(8, True)": ({"hidden_layer_sizes": (8, True)}, "hidden_layer_sizes"),
    "hidden_layer_sizes=[[8]]": ({"hidden_layer_sizes": [[8]]}, "hidden_layer_sizes"),
    "hidden_layer_sizes='abc'": ({"hidden_layer_sizes": "abc"}, "hidden_layer_sizes"),
    "hidden_layer_sizes=5": ({"hidden_layer_sizes": 5}, "hidden_layer_sizes"),
    "hidden_layer_sizes=None": ({"hidden_layer_sizes": None}, "hidden_layer_sizes"),
    "batch_size=0": ({"batch_size": 0}, "batch_size"),
    "batch_size=-5": ({"batch_size": -5}, "batch_size"),
    "batch_size=2.5": ({"batch_size": 2.5}, "batch_size"),
    "learning_rate_init=0": ({"learning_rate_init": 0}, "learning_rate_init"),
    "learning_rate_init=-1": ({"learning_rate_init": -1e-3}, "learning_rate_init"),
    "learning_rate_init=nan": ({"learning_rate_init": np.nan}, "learning_rate_init"),
    "learning_rate_init=inf": ({"learning_rate_init": np.inf}, "learning_rate_init"),
    "learning_rate_init='big'": ({"learning_rate_init": "big"}, "learning_rate_init"),
    "max_iter=-1": ({"max_iter": -1}, "max_iter"),
    "max_iter=2.0": ({"max_iter": 2.0}, "max_iter"),
    "tol=-1": ({"tol": -1}, "tol"),
    "tol=nan": ({"tol": np.nan}, "tol"),
    "validation_fraction=0": ({"validation_fraction": 0.0}, "validation_fraction"),
    "validation_fraction=1": ({"validation_fraction": 1.0}, "validation_fraction"),
    "n_iter_no_change=0": ({"n_iter_no_change": 0}, "n_iter_no_change"),
    "n_eval_samples=0": ({"n_eval_samples": 0}, "n_eval_samples"),
    "activation='gelu'": ({"activation": "gelu"}, "activation"),
    "score_method='exact'": ({"score_method": "exact"}, "score_method"),
    "quadrature with 3 latents": ({"score_method": "quadrature", "n_components": 3},
                                  "score_method='quadrature' needs n_components <= 2"),
    "random_state='x'": ({"random_state": "x"}, "random_state"),
    "random_state=-1": ({"random_state": -1}, "random_state"),
    "early_stopping='yes'": ({"early_stopping": "yes"}, "early_stopping"),
    "warm_start=1": ({"warm_start": 1}, "warm_start"),
    "verbose=-1": ({"verbose": -1}, "verbose"),
    "dtype='float16'": ({"dtype": "float16"}, "dtype"),
    "dtype=np.float64": ({"dtype": np.float64}, "dtype"),
    "device='tpu'": ({"device": "tpu"}, "device='tpu' is not a valid torch device"),
    "device=''": ({"device": ""}, "device='' is not a valid torch device"),
    "device='meta'": ({"device": "meta"}, "device='meta' is not supported"),
    "device=3": ({"device": 3}, "device"),
    "device=None": ({"device": None}, "device"),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_parameters(Estimator, X, case):
    params, match = BAD_PARAMS[case]
    with pytest.raises(ValueError, match=match):
        make(Estimator, **params).fit(X)


def _integer_parameters(cls):
    return sorted(
        name
        for name, constraints in cls._parameter_constraints.items()
        if any(isinstance(c, Interval) and c.type is Integral for c in constraints)
    )


def test_integer_parameters_refuse_bools_and_zero(Estimator, X):
    """Every int parameter (the estimator's own included) names itself when
    given a bool or a value below its range."""
    names = _integer_parameters(Estimator)
    assert {"n_components", "batch_size", "max_iter"} <= set(names)
    for name in names:
        with pytest.raises(ValueError, match=f"'{name}' parameter .* must be an int"):
            make(Estimator, **{name: True}).fit(X)
        low = next(c.left for c in Estimator._parameter_constraints[name]
                   if isinstance(c, Interval))
        with pytest.raises(ValueError, match=f"'{name}' parameter"):
            make(Estimator, **{name: low - 1}).fit(X)


@pytest.mark.parametrize(
    "name", ["n_components", "batch_size", "max_iter", "n_eval_samples", "n_iter_no_change",
             "random_state"]
)
def test_numpy_integer_parameters(Estimator, X, name, request):
    """numpy ints (as GridSearchCV gives from np.arange) work like ints."""
    if name == "n_components" and issubclass(Estimator, AmortizedDensity):
        request.applymarker(pytest.mark.xfail(
            strict=True, raises=TypeError,
            reason="AmortizedDensity._network_specs passes n_components to "
                   "GaussianEncoder, whose Tensor.split needs a Python int",
        ))
    value = {"max_iter": 2, "n_eval_samples": 32}.get(name, 2)
    est = make(Estimator, **{name: np.int64(value)}).fit(X)
    ref = make(Estimator, **{name: value}).fit(X)
    np.testing.assert_array_equal(est.score_samples(X), ref.score_samples(X))
    assert est.sample(np.int64(3)).shape == (3, 3)


def test_device_cuda_without_cuda(Estimator, X):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            make(Estimator, device=device).fit(X)


def test_device_mps_without_mps(Estimator, X):
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        pytest.skip("MPS is available here")
    with pytest.raises(ValueError, match="MPS is not available on this machine"):
        make(Estimator, device="mps").fit(X)


def test_parameters_are_not_modified_by_fit(Estimator, X):
    sizes = [8]
    est = make(Estimator, hidden_layer_sizes=sizes, device="cpu", random_state=np.int64(0))
    before = est.get_params()
    est.fit(X)
    assert sizes == [8]
    after = est.get_params()
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] is before[key], key


# ----------------------------------------------------------------------
# inputs are never modified
# ----------------------------------------------------------------------
def _frozen(a):
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("order", ["C", "F"])
def test_inputs_are_never_modified(Estimator, X, dtype, order):
    data = _frozen(np.asarray(X, dtype=dtype, order=order))
    w = _frozen(np.linspace(0.5, 2.0, len(X)))
    Z = _frozen(np.asarray(np.linspace(-1, 1, 8).reshape(4, 2), dtype=dtype, order=order))
    originals = [a.copy() for a in (data, w, Z)]
    writable = [np.array(a) for a in (data, w, Z)]  # the same values, writable
    est = make(Estimator, n_components=2).fit(data, sample_weight=w)
    est.score_samples(data)
    est.score(data)
    est.transform(data)
    est.inverse_transform(Z)
    est2 = make(Estimator, n_components=2)
    est2.fit_transform(writable[0])
    est2.fit(writable[0], sample_weight=writable[1]).score_samples(writable[0])
    est2.inverse_transform(writable[2])
    for a, b in zip(originals, (data, w, Z)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(originals, writable):
        np.testing.assert_array_equal(a, b)


def test_pandas_input_is_never_modified(Estimator, X):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    w = pd.Series(np.linspace(0.5, 2.0, len(X)))
    df_copy, w_copy = df.copy(deep=True), w.copy(deep=True)
    est = make(Estimator).fit(df, sample_weight=w)
    est.score_samples(df)
    est.transform(df)
    pd.testing.assert_frame_equal(df, df_copy)
    pd.testing.assert_series_equal(w, w_copy)


# ----------------------------------------------------------------------
# hard data: fit completes and every log-density is finite
# ----------------------------------------------------------------------
def _hard_data():
    rng = np.random.RandomState(3)
    X = rng.randn(60, 3)
    return {
        "constant column": np.c_[X[:, :2], np.full(60, 5.0)],
        "all rows identical": np.ones((30, 3)),
        "duplicated rows": np.repeat(X[:4], 15, axis=0),
        "scale 1e-6": X * 1e-6,
        "scale 1e6": X * 1e6,
        "offset 1e6, spread 1e-3": X * 1e-3 + 1e6,
        "mixed column scales": X * [1e-6, 1.0, 1e6],
        "one outlier at 1e8": np.r_[X[:-1], [[1e8, -1e8, 1e8]]],
        "heavy tails (Cauchy)": rng.standard_cauchy((60, 3)),
        "two rows": X[:2],
        "few distinct values": rng.randint(0, 3, (60, 3)).astype(float),
    }


HARD = _hard_data()


@pytest.mark.parametrize("n_components", [1, 2])
@pytest.mark.parametrize("case", list(HARD))
def test_hard_data(Estimator, case, n_components):
    data = HARD[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. n_neighbors > n rows
        est = make(Estimator, n_components=n_components).fit(data)
    spread = np.where(data.std(0) > 0, data.std(0), 1.0)
    nearby = data + np.random.RandomState(0).randn(*data.shape) * spread
    for rows in (data, nearby, data.mean(0, keepdims=True)):
        assert np.all(np.isfinite(est.score_samples(rows))), case
    assert np.all(np.isfinite(est.sample(10, random_state=0)))
    assert np.all(np.isfinite(est.transform(data)))
    assert np.all(np.isfinite(est.loss_curve_))
    assert np.all(est.noise_scale_ > 0) and np.all(est.scale_ > 0)
    # a data-derived bandwidth (MAPA) must not collapse on duplicated rows
    if hasattr(est, "bandwidth_"):
        assert est.bandwidth_ > 0
