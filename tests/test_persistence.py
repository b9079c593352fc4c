"""skmapa.save / skmapa.load: exact round trips, and no code runs on load."""

import io
import json
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

import skmapa
from skmapa._base import BaseDeepDensity

pytest.importorskip("safetensors")
import safetensors.torch  # noqa: E402

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
    return rng.randn(80, 3) * [1.0, 10.0, 0.1] + [0.0, 5.0, -1.0]


@pytest.fixture(params=ESTIMATORS, ids=lambda c: c.__name__)
def Estimator(request):
    return request.param


def assert_same_value(a, b, name):
    assert type(a) is type(b), name
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (name, key)
            assert torch.equal(sa[key], sb[key]), (name, key)
        assert a.training == b.training, name
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device, name
        assert a.requires_grad == b.requires_grad, name
        assert torch.equal(a, b), name
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            assert_same_value(x, y, name)
    elif isinstance(a, dict):
        assert list(a) == list(b), name
        for key in a:
            assert_same_value(a[key], b[key], (name, key))
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), name
    else:
        assert a == b, name


def public_fitted(est):
    return {k: v for k, v in vars(est).items() if k.endswith("_") and not k.startswith("_")}


def document(data):
    """The JSON document of a saved file."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return json.loads(header["__metadata__"]["skmapa"])


def rewrite(data, change):
    """The file ``data`` with its JSON document passed through ``change``."""
    doc = document(data)
    change(doc)
    tensors = safetensors.torch.load(data)
    return safetensors.torch.save(tensors, metadata={"skmapa": json.dumps(doc)})


def saved_bytes(est):
    buf = io.BytesIO()
    skmapa.save(est, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fitted_vae(X):
    return make(skmapa.VAEDensity, n_components=2).fit(X)


# ----------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------
@pytest.mark.parametrize("n_components", [1, 2])
def test_round_trip_is_exact(Estimator, n_components, X, tmp_path):
    est = make(Estimator, n_components=n_components).fit(X)
    X_test = X[:20] + 0.3
    scores = est.score_samples(X_test)
    path = tmp_path / "model.safetensors"
    skmapa.save(est, path)
    # saving leaves the estimator as it was
    np.testing.assert_array_equal(est.score_samples(X_test), scores)
    rng_state = torch.get_rng_state()
    again = skmapa.load(path)
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched

    assert type(again) is Estimator
    assert_same_value(again.get_params(deep=False), est.get_params(deep=False), "params")
    fitted = public_fitted(est)
    assert set(public_fitted(again)) == set(fitted)
    # state the estimator rebuilds in _after_load (a neighbour index) is
    # compared through the scores below
    derived = set(document(path.read_bytes())["derived"])
    for name, value in fitted.items():
        if name not in derived:
            assert_same_value(getattr(again, name), value, name)
    assert again._torch_dtype == est._torch_dtype

    np.testing.assert_array_equal(again.score_samples(X_test), scores)
    np.testing.assert_array_equal(again.transform(X_test), est.transform(X_test))
    Z = np.linspace(-2, 2, 10 * n_components).reshape(10, n_components)
    np.testing.assert_array_equal(again.inverse_transform(Z), est.inverse_transform(Z))
    np.testing.assert_array_equal(again.sample(5, random_state=1), est.sample(5, random_state=1))
    # the file holds everything: saving the loaded model writes the same bytes
    assert saved_bytes(again) == path.read_bytes()
    # and pickle keeps working on a loaded model
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(again)).score_samples(X_test), scores)


def test_float32_model_round_trip(X, tmp_path):
    est = make(skmapa.IWAEDensity, n_components=2, dtype="float32").fit(X)
    skmapa.save(est, tmp_path / "m")
    again = skmapa.load(tmp_path / "m")
    assert again.decoder_.raw_scale.dtype == torch.float32
    np.testing.assert_array_equal(again.score_samples(X), est.score_samples(X))


def test_loaded_model_continues_training_like_the_original(Estimator, X):
    est = make(Estimator, n_components=2, warm_start=True).fit(X)
    first = est.n_iter_
    again = skmapa.load(io.BytesIO(saved_bytes(est)))
    est.fit(X)
    again.fit(X)
    assert again.n_iter_ == est.n_iter_ == 2 * first
    np.testing.assert_array_equal(again.loss_curve_, est.loss_curve_)
    np.testing.assert_array_equal(again.score_samples(X), est.score_samples(X))


def test_unfitted_estimator_round_trip(Estimator, tmp_path):
    est = make(Estimator, hidden_layer_sizes=[16, 4], device=torch.device("cpu"))
    skmapa.save(est, tmp_path / "m")
    again = skmapa.load(tmp_path / "m")
    assert_same_value(again.get_params(deep=False), est.get_params(deep=False), "params")
    with pytest.raises(NotFittedError):
        again.score_samples(np.zeros((1, 3)))


def test_feature_names_and_output_config_are_kept(X, tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    est = make(skmapa.VAEDensity, n_components=2).set_output(transform="pandas").fit(df)
    skmapa.save(est, tmp_path / "m")
    again = skmapa.load(tmp_path / "m")
    assert again.feature_names_in_.dtype == object
    assert list(again.feature_names_in_) == ["a", "b", "c"]
    out = again.transform(df)
    assert isinstance(out, pd.DataFrame)
    pd.testing.assert_frame_equal(out, est.transform(df))
    with pytest.raises(ValueError, match="feature names should match"):
        again.score_samples(df.rename(columns={"a": "z"}))


def test_numpy_scalar_parameters_keep_their_type(X, tmp_path):
    est = make(skmapa.VAEDensity, n_components=1, learning_rate_init=np.float32(0.01),
               random_state=np.int64(3), hidden_layer_sizes=np.array([8])).fit(X)
    skmapa.save(est, tmp_path / "m")
    params = skmapa.load(tmp_path / "m").get_params()
    assert type(params["learning_rate_init"]) is np.float32
    assert type(params["random_state"]) is np.int64
    np.testing.assert_array_equal(params["hidden_layer_sizes"], [8])


def test_model_from_an_unavailable_device_loads_on_cpu(fitted_vae, X):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")

    def to_cuda(doc):
        doc["attributes"]["device_"]["value"] = "cuda:0"

    data = rewrite(saved_bytes(fitted_vae), to_cuda)
    with pytest.warns(UserWarning, match="not available here"):
        again = skmapa.load(io.BytesIO(data))
    assert again.device_ == torch.device("cpu")
    np.testing.assert_array_equal(again.score_samples(X), fitted_vae.score_samples(X))


# ----------------------------------------------------------------------
# what cannot be saved
# ----------------------------------------------------------------------
def test_random_state_instance_is_refused_clearly(X):
    est = make(skmapa.VAEDensity, random_state=np.random.RandomState(0)).fit(X)
    with pytest.raises(TypeError, match=r"random_state=RandomState.*JSON.*set_params"):
        saved_bytes(est)


def test_non_skmapa_estimator_is_refused():
    from sklearn.neighbors import KernelDensity

    class MyVAE(skmapa.VAEDensity):
        pass

    for est in (KernelDensity(), MyVAE()):
        with pytest.raises(TypeError, match="saves skmapa's estimators"):
            saved_bytes(est)


def test_unknown_fitted_state_is_refused_without_after_load(X):
    est = make(skmapa.VAEDensity).fit(X)
    est.extra_ = object()
    with pytest.raises(TypeError, match="'extra_'.*_after_load"):
        saved_bytes(est)


def test_after_load_must_rebuild_unsaved_state(X, monkeypatch):
    est = make(skmapa.VAEDensity).fit(X)
    est.index_ = object()
    monkeypatch.setattr(skmapa.VAEDensity, "_after_load", lambda self: None, raising=False)
    data = saved_bytes(est)
    with pytest.raises(ValueError, match="did not rebuild.*index_"):
        skmapa.load(io.BytesIO(data))

    def rebuild(self):
        self.index_ = "rebuilt"

    monkeypatch.setattr(skmapa.VAEDensity, "_after_load", rebuild)
    assert skmapa.load(io.BytesIO(data)).index_ == "rebuilt"


def test_missing_safetensors_gives_a_clear_import_error(fitted_vae, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'skmapa\[persistence\]'"):
        saved_bytes(fitted_vae)
    with pytest.raises(ImportError, match="safetensors"):
        skmapa.load(io.BytesIO(b"whatever"))


# ----------------------------------------------------------------------
# versions and crafted files
# ----------------------------------------------------------------------
def test_newer_format_version_is_refused(fitted_vae):
    def newer(doc):
        doc["format_version"] = 99
        doc["skmapa_version"] = "9.0"

    with pytest.raises(ValueError, match=r"format version 99.*newer skmapa.*Upgrade"):
        skmapa.load(io.BytesIO(rewrite(saved_bytes(fitted_vae), newer)))


class _Payload:
    """Unpickling this creates a directory: the proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_a_pickle_payload_is_never_unpickled(tmp_path):
    target = str(tmp_path / "pwned")
    path = tmp_path / "model.safetensors"
    for dump in (pickle.dumps, lambda obj: pickle.dumps(obj, protocol=0)):
        path.write_bytes(dump(_Payload(target)))
        with pytest.raises(ValueError, match="Not a valid skmapa model file"):
            skmapa.load(path)
        assert not os.path.exists(target)
    torch.save({"x": _Payload(target)}, path)
    with pytest.raises(ValueError, match="Not a valid skmapa model file"):
        skmapa.load(path)
    assert not os.path.exists(target)
    # the payload is real: unpickling it does run code
    pickle.loads(pickle.dumps(_Payload(target)))
    assert os.path.exists(target)


def test_load_uses_no_pickle_and_imports_nothing_from_the_file(fitted_vae, X, monkeypatch):
    data = saved_bytes(fitted_vae)

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not unpickle or import")

    for module, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                         (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    import importlib

    monkeypatch.setattr(importlib, "import_module", forbidden)
    again = skmapa.load(io.BytesIO(data))
    np.testing.assert_array_equal(again.score_samples(X), fitted_vae.score_samples(X))


def _set(path, value):
    def change(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


CRAFTED = {
    "class os.system": (_set(["class"], "os.system"), "not an skmapa estimator"),
    "class system": (_set(["class"], "system"), "not an skmapa estimator"),
    "class BaseDeepDensity": (_set(["class"], "BaseDeepDensity"), "not an skmapa estimator"),
    "class Pipeline": (_set(["class"], "Pipeline"), "not an skmapa estimator"),
    "unknown parameter": (_set(["params", "command"], "touch pwned"), "unknown parameters"),
    "invalid parameter": (_set(["params", "activation"], "os.system"), "activation"),
    "dunder attribute": (_set(["attributes", "__class__"], "x"), "not a fitted attribute"),
    "method attribute": (_set(["attributes", "fit_transform"], 1), "not a fitted attribute"),
    "unknown value type": (
        _set(["attributes", "mean_x_"], {"__type__": "pickle", "data": "gASV"}),
        "unknown JSON value type",
    ),
    "object numpy scalar": (
        _set(["attributes", "n_iter_"], {"__type__": "numpy_scalar", "dtype": "|O",
                                          "value": 1}),
        "not allowed",
    ),
    "torch dtype": (_set(["torch_dtype"], "complex128"), "torch_dtype"),
    "malformed section": (_set(["arrays"], ["mean_"]), "malformed 'arrays'"),
    "missing tensor": (_set(["arrays", "extra_"], {"dtype": "<f8"}), "'array:extra_' is missing"),
    "object array dtype": (_set(["arrays", "mean_"], {"dtype": "|O"}), "has the dtype"),
    "extra network": (_set(["modules", "evil_"], {"training": False}), "networks"),
    "not skmapa": (_set(["format"], "other"), "does not describe an skmapa model"),
    "bad version": (_set(["format_version"], "1"), "format_version"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_are_refused(fitted_vae, case):
    change, match = CRAFTED[case]
    data = rewrite(saved_bytes(fitted_vae), change)
    with pytest.raises(ValueError, match=match):
        skmapa.load(io.BytesIO(data))


def test_corrupt_files_are_refused(fitted_vae, tmp_path):
    data = saved_bytes(fitted_vae)
    for bad in (
        b"",
        b"abc",
        struct.pack("<Q", 2**40) + data[8:],  # header length beyond the file
        data[:8] + b"X" + data[9:],  # the header is not JSON
        data[:-8],  # truncated tensor data
        safetensors.torch.save({"x": torch.zeros(2)}),  # not an skmapa file
    ):
        with pytest.raises(ValueError, match="Not a valid skmapa model file"):
            skmapa.load(io.BytesIO(bad))
