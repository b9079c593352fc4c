"""Saving and loading fitted estimators without pickle.

``save(est, path)`` writes one safetensors file: every tensor of the fitted
model (network weights, fitted tensors, numeric arrays) is a safetensors
tensor, and everything else (the class name, the parameters, scalar and list
attributes, feature names) is a JSON document kept in the file's metadata.
``load(path)`` parses that JSON and the safetensors tensors, and nothing else:
no pickle, no ``torch.load``, no import of a name found in the file. Only the
estimator classes exported by ``skmapa`` can be loaded; their networks are
rebuilt from the class's own ``_network_specs`` and filled with the saved
weights.

The file is written generically from the estimator's state:

* parameters: ``get_params(deep=False)``, as JSON;
* fitted attributes (public names ending in ``_``): modules as their
  ``state_dict``, tensors and numeric arrays as safetensors tensors, other
  values (scalars, lists, dicts, string arrays) as JSON;
* derived state (private attributes: the quadrature grid and the like) is
  not saved but rebuilt on load by ``_build_quadrature`` and, when the
  estimator defines it, ``_after_load``. A public attribute that neither
  format can hold (a fitted scikit-learn object such as a neighbour index)
  is recorded by name only; the estimator must define ``_after_load`` to
  rebuild it, and ``load`` checks that it did.

The format has a version; a file written by a newer format is refused.
Safetensors is an optional dependency (``pip install 'skmapa[persistence]'``).
"""

import json
import os
import struct
import warnings

import numpy as np
import torch

from ._utils import resolve_device

__all__ = ["save", "load"]

#: Version of the file format written by ``save``; ``load`` reads it and older.
FORMAT_VERSION = 1
#: The ``format`` entry that marks a file as an skmapa model.
FORMAT_NAME = "skmapa-model"
#: The metadata key of the JSON document in the safetensors header.
METADATA_KEY = "skmapa"
#: Private attributes that are user configuration rather than derived state.
_CONFIG_ATTRIBUTES = ("_sklearn_output_config",)
#: Torch dtypes an estimator computes in.
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Numpy dtype kinds a JSON-held array may have.
_JSON_ARRAY_KINDS = set("biufUO")
#: Numpy dtypes stored as safetensors tensors (through torch).
_TENSOR_ARRAY_DTYPES = {
    np.dtype(t)
    for t in (
        np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.bool_,
    )
}


class _Unsaveable(TypeError):
    """A value that neither JSON nor safetensors can hold."""


class _BadFile(ValueError):
    """The file is not a well-formed skmapa model."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(
            "skmapa.save and skmapa.load need the optional dependency "
            "'safetensors'; install it with: pip install 'skmapa[persistence]' "
            "(or pip install safetensors)."
        ) from exc
    return safetensors.torch


def _estimator_classes():
    """The allow-list: skmapa's exported estimator classes, by name."""
    import skmapa

    from ._base import BaseDeepDensity

    classes = {}
    for name in skmapa.__all__:
        obj = getattr(skmapa, name, None)
        if isinstance(obj, type) and issubclass(obj, BaseDeepDensity):
            classes[name] = obj
    return classes


# ----------------------------------------------------------------------
# JSON values: plain JSON, with tagged objects for tuples, dicts, numpy
# scalars and arrays and torch devices. Decoding accepts exactly these tags.
# ----------------------------------------------------------------------
def _to_json(value):
    if value is None or (isinstance(value, (bool, str)) and not isinstance(value, np.generic)):
        return value
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biufU":
            raise _Unsaveable(value)
        return {"__type__": "numpy_scalar", "dtype": value.dtype.str, "value": value.item()}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return {"__type__": "tuple", "items": [_to_json(v) for v in value]}
    if isinstance(value, dict) and type(value) is dict:
        return {
            "__type__": "dict",
            "items": [[_to_json(k), _to_json(v)] for k, v in value.items()],
        }
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _JSON_ARRAY_KINDS:
            raise _Unsaveable(value)
        flat = value.ravel().tolist()
        if value.dtype.kind == "O":
            flat = [_to_json(v) for v in flat]
        return {
            "__type__": "ndarray",
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "data": flat,
        }
    if isinstance(value, torch.device):
        return {"__type__": "device", "value": str(value)}
    raise _Unsaveable(value)


def _bad_file(message):
    return _BadFile(f"Not a valid skmapa model file: {message}")


def _json_dtype(text):
    try:
        dtype = np.dtype(str(text))
    except TypeError as exc:
        raise _bad_file(f"unknown dtype {text!r}.") from exc
    if dtype.kind not in _JSON_ARRAY_KINDS:
        raise _bad_file(f"dtype {text!r} is not allowed.")
    return dtype


def _from_json(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        raise _bad_file(f"unexpected JSON value {value!r}.")
    kind = value.get("__type__")
    try:
        if kind == "tuple":
            return tuple(_from_json(v) for v in value["items"])
        if kind == "dict":
            return {_from_json(k): _from_json(v) for k, v in value["items"]}
        if kind == "numpy_scalar":
            dtype = _json_dtype(value["dtype"])
            if dtype.kind == "O":
                raise _bad_file("an object numpy scalar is not allowed.")
            return dtype.type(value["value"])
        if kind == "ndarray":
            dtype = _json_dtype(value["dtype"])
            shape = tuple(int(s) for s in value["shape"])
            data = value["data"]
            if dtype.kind == "O":
                out = np.empty(len(data), dtype=object)
                for i, v in enumerate(data):
                    out[i] = _from_json(v)
                return out.reshape(shape)
            return np.asarray(data, dtype=dtype).reshape(shape)
        if kind == "device":
            return torch.device(str(value["value"]))
    except _BadFile:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise _bad_file(f"malformed {kind!r} value ({exc}).") from exc
    raise _bad_file(f"unknown JSON value type {kind!r}.")


# ----------------------------------------------------------------------
# save
# ----------------------------------------------------------------------
def _params_json(est):
    params = {}
    for name, value in est.get_params(deep=False).items():
        try:
            params[name] = _to_json(value)
        except _Unsaveable:
            hint = ""
            if name == "random_state":
                hint = (
                    " The fitted model does not depend on it: set an int or None "
                    "first, e.g. est.set_params(random_state=0)."
                )
            raise TypeError(
                f"Cannot save {type(est).__name__}: parameter {name}={value!r} "
                "cannot be stored as JSON (None, bool, int, float, str, and lists, "
                f"tuples and dicts of these).{hint}"
            ) from None
    return params


def _fitted_items(est):
    """The public fitted attributes (names ending in '_'), in a stable order."""
    return sorted(
        (name, value)
        for name, value in vars(est).items()
        if name.endswith("_") and not name.startswith("_")
    )


def _cpu_tensor(tensor):
    return tensor.detach().to("cpu").contiguous().clone()


def _state(est):
    """(document, tensors) describing the estimator."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "class": type(est).__name__,
        "params": _params_json(est),
        "config": {},
    }
    from . import __version__

    doc["skmapa_version"] = __version__
    doc["torch_version"] = torch.__version__
    for name in _CONFIG_ATTRIBUTES:
        if name in vars(est):
            try:
                doc["config"][name] = _to_json(vars(est)[name])
            except _Unsaveable:
                pass
    fitted = _fitted_items(est)
    if not fitted:
        return doc, {}
    if "device_" not in vars(est) or "_torch_dtype" not in vars(est):
        raise ValueError(
            f"Cannot save this {type(est).__name__}: it is not completely fitted "
            "(a fit that raised leaves it so); fit it again first."
        )
    specs = est._network_specs(est.n_features_in_)
    tensors = {}
    attributes, arrays, tensor_attrs, modules, derived = {}, {}, {}, {}, []
    for name, value in fitted:
        if isinstance(value, torch.nn.Module):
            if name not in specs:
                raise TypeError(
                    f"Cannot save {type(est).__name__}: the network {name!r} is not "
                    "listed by its _network_specs, so it could not be rebuilt."
                )
            modules[name] = {"training": bool(value.training)}
            for key, t in value.state_dict().items():
                tensors[f"module:{name}:{key}"] = _cpu_tensor(t)
        elif isinstance(value, torch.Tensor):
            tensor_attrs[name] = {
                "parameter": isinstance(value, torch.nn.Parameter),
                "requires_grad": bool(value.requires_grad),
            }
            tensors[f"tensor:{name}"] = _cpu_tensor(value)
        elif isinstance(value, np.ndarray) and value.dtype in _TENSOR_ARRAY_DTYPES:
            native = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
            arrays[name] = {"dtype": value.dtype.str}
            tensors[f"array:{name}"] = torch.from_numpy(native.copy())
        elif name == "device_":
            attributes[name] = _to_json(torch.device(value))
        else:
            try:
                attributes[name] = _to_json(value)
            except _Unsaveable:
                if not hasattr(est, "_after_load"):
                    raise TypeError(
                        f"Cannot save {type(est).__name__}: the fitted attribute "
                        f"{name!r} ({type(value).__name__}) is neither a tensor, an "
                        "array nor a JSON value. An estimator with such state must "
                        "rebuild it in an _after_load method."
                    ) from None
                derived.append(name)
    missing = sorted(set(specs) - set(modules))
    if missing:
        raise ValueError(
            f"Cannot save this {type(est).__name__}: its networks {missing} are "
            "missing; fit it again first."
        )
    doc.update(
        attributes=attributes,
        arrays=arrays,
        tensors=tensor_attrs,
        modules=modules,
        derived=derived,
        torch_dtype=str(est._torch_dtype).replace("torch.", ""),
    )
    return doc, tensors


def save(est, path):
    """Save an estimator to one file that can be loaded without running code.

    The file holds the parameters and the fitted state: the networks'
    weights and fitted tensors and arrays in safetensors format, the rest as
    JSON in the file's metadata. Unlike a pickle, loading it runs no code
    from the file. Needs the optional dependency ``safetensors``
    (``pip install 'skmapa[persistence]'``).

    Parameters
    ----------
    est : MAPADensity, VAEDensity or IWAEDensity
        The estimator, fitted or not.
    path : str, path-like or binary file object
        Where to write.

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import skmapa
    >>> X = np.random.RandomState(0).normal(size=(100, 2))
    >>> est = skmapa.VAEDensity(n_components=1, max_iter=5, random_state=0).fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> skmapa.save(est, path)
    >>> again = skmapa.load(path)
    >>> bool(np.array_equal(again.score_samples(X), est.score_samples(X)))
    True
    """
    st = _safetensors()
    allowed = _estimator_classes()
    if allowed.get(type(est).__name__) is not type(est):
        raise TypeError(
            f"skmapa.save saves skmapa's estimators ({', '.join(sorted(allowed))}), "
            f"got {type(est).__qualname__}."
        )
    doc, tensors = _state(est)
    text = json.dumps(doc, sort_keys=True, allow_nan=True)
    data = st.save(tensors, metadata={METADATA_KEY: text})
    if hasattr(path, "write"):
        path.write(data)
        return
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------
# load
# ----------------------------------------------------------------------
def _read_document(data):
    """The JSON document from the safetensors header, checked."""
    if len(data) < 8:
        raise _bad_file("the file is too short.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _bad_file("no safetensors header (is it a pickle or another format?).")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        text = header["__metadata__"][METADATA_KEY]
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise _bad_file(
            "no skmapa metadata in a safetensors header (is it a pickle or "
            "another format?)."
        ) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise _bad_file("its metadata does not describe an skmapa model.")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad_file(f"format_version {version!r} is not a positive int.")
    if version > FORMAT_VERSION:
        from . import __version__

        raise ValueError(
            f"This model file has format version {version}, written by a newer "
            f"skmapa ({doc.get('skmapa_version', 'unknown version')}); this skmapa "
            f"({__version__}) reads format versions up to {FORMAT_VERSION}. "
            "Upgrade skmapa to load it."
        )
    return doc


def _check_name(cls, name):
    if not (
        isinstance(name, str)
        and name.isidentifier()
        and name.endswith("_")
        and not name.startswith("_")
        and not hasattr(cls, name)
    ):
        raise _bad_file(f"{name!r} is not a fitted attribute name.")


def _device(saved):
    wanted = torch.device(saved)
    try:
        return resolve_device(str(wanted))
    except ValueError:
        warnings.warn(
            f"This estimator was fitted on {wanted}, which is not available here; "
            "it is loaded on the CPU.",
            UserWarning,
        )
        return torch.device("cpu")


def load(path):
    """Load an estimator saved by :func:`save`.

    Reads JSON and safetensors only: no pickle, no import of a name found in
    the file; only skmapa's own estimator classes are built. A model fitted on
    a device that is not available here is loaded on the CPU, with a warning.

    Parameters
    ----------
    path : str, path-like or binary file object
        The file written by ``save``.

    Returns
    -------
    est : MAPADensity, VAEDensity or IWAEDensity
        The estimator, with the saved parameters and fitted state.

    Raises
    ------
    ValueError
        If the file is not an skmapa model, names a class that is not an
        skmapa estimator, or was written by a newer skmapa format.
    """
    st = _safetensors()
    if hasattr(path, "read"):
        data = path.read()
    else:
        with open(os.fspath(path), "rb") as f:
            data = f.read()
    if not isinstance(data, bytes):
        raise TypeError("load reads binary files; open the file with mode 'rb'.")
    doc = _read_document(data)
    allowed = _estimator_classes()
    name = doc.get("class")
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(
            f"This file names the class {name!r}, which is not an skmapa estimator; "
            f"only {', '.join(sorted(allowed))} can be loaded."
        )
    cls = allowed[name]
    params = doc.get("params")
    if not isinstance(params, dict):
        raise _bad_file("no parameters.")
    params = {k: _from_json(v) for k, v in params.items()}
    unknown = set(params) - set(cls._get_param_names())
    if unknown:
        raise _bad_file(f"unknown parameters {sorted(unknown)} for {name}.")
    est = cls(**params)
    est._validate_params()
    config = doc.get("config") or {}
    for key, value in config.items():
        if key in _CONFIG_ATTRIBUTES:
            setattr(est, key, _from_json(value))
    if "attributes" not in doc:
        return est  # an unfitted estimator

    try:
        tensors = st.load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise _bad_file(f"its tensors cannot be read ({exc}).") from exc

    def tensor(key):
        if key not in tensors:
            raise _bad_file(f"the tensor {key!r} is missing.")
        return tensors[key]

    for section, kind in [("attributes", dict), ("arrays", dict), ("tensors", dict),
                          ("modules", dict), ("derived", list)]:
        if not isinstance(doc.get(section, kind()), kind):
            raise _bad_file(f"malformed {section!r}.")
    attributes = doc["attributes"]
    for attr, value in attributes.items():
        _check_name(cls, attr)
        setattr(est, attr, _from_json(value))
    for attr, info in doc.get("arrays", {}).items():
        _check_name(cls, attr)
        if not isinstance(info, dict):
            raise _bad_file(f"malformed entry for the array {attr!r}.")
        dtype = _json_dtype(info.get("dtype"))
        if dtype.newbyteorder("=") not in _TENSOR_ARRAY_DTYPES:
            raise _bad_file(f"the array {attr!r} has the dtype {dtype}.")
        array = tensor(f"array:{attr}").numpy().astype(dtype)
        setattr(est, attr, array)
    for attr, info in doc.get("tensors", {}).items():
        _check_name(cls, attr)
        if not isinstance(info, dict):
            raise _bad_file(f"malformed entry for the tensor {attr!r}.")
        value = tensor(f"tensor:{attr}")
        if info.get("parameter"):
            value = torch.nn.Parameter(value, requires_grad=bool(info["requires_grad"]))
        else:
            value.requires_grad_(bool(info.get("requires_grad", False)))
        setattr(est, attr, value)

    if doc.get("torch_dtype") not in _TORCH_DTYPES:
        raise _bad_file(f"unknown torch_dtype {doc.get('torch_dtype')!r}.")
    est._torch_dtype = _TORCH_DTYPES[doc["torch_dtype"]]
    if not isinstance(getattr(est, "device_", None), torch.device):
        raise _bad_file("no device_.")
    est.device_ = _device(est.device_)
    if not isinstance(getattr(est, "n_features_in_", None), int):
        raise _bad_file("no n_features_in_.")

    specs = est._network_specs(est.n_features_in_)
    saved_modules = doc.get("modules", {})
    if set(saved_modules) != set(specs):
        raise _bad_file(
            f"its networks {sorted(saved_modules)} are not those of {name} "
            f"({sorted(specs)})."
        )
    for attr, info in saved_modules.items():
        module_cls, *args = specs[attr]
        # nn.Linear initialises from torch's global generator: keep it intact;
        # load_state_dict overwrites every value anyway.
        with torch.random.fork_rng(devices=[]):
            module = module_cls(*args)
        module = module.to(dtype=est._torch_dtype)
        prefix = f"module:{attr}:"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise _bad_file(f"the weights of {attr!r} do not fit {name} ({exc}).") from exc
        module.train(bool(info.get("training", False)))
        setattr(est, attr, module)
    est._move_networks()
    est._build_quadrature()
    if hasattr(est, "_after_load"):
        est._after_load()
    missing = [attr for attr in doc.get("derived", []) if not hasattr(est, attr)]
    if missing:
        raise ValueError(
            f"{name}._after_load did not rebuild the attributes {missing} that "
            "were not saved."
        )
    return est
