"""Small shared helpers: devices, dtypes and random number streams."""

import numbers
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.utils import check_random_state

_DEVICE_TYPES = ("cpu", "cuda", "mps")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device):
    """Return the ``torch.device`` that ``device`` asks for, checking it exists.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}."
        )
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"device={device!r} is not a valid torch device; use 'auto', 'cpu', "
            "'cuda', 'cuda:N' or 'mps'."
        ) from exc
    if resolved.type not in _DEVICE_TYPES:
        raise ValueError(
            f"device={device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'mps'."
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this "
                "machine; use device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)."
            )
    if resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device={device!r} was requested but MPS is not available on this "
                "machine; use device='cpu' or device='auto'."
            )
    return resolved


def resolve_dtype(dtype, device):
    """Return the torch dtype for ``dtype`` ('auto', 'float32' or 'float64').

    'auto' is float64 on the CPU (exact enough for scikit-learn's invariance
    checks) and float32 on accelerators; MPS has no float64 and always gets
    float32, with a warning when float64 was asked for.
    """
    if dtype == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    if dtype in (np.float32, torch.float32):
        dtype = "float32"
    if dtype in (np.float64, torch.float64):
        dtype = "float64"
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype must be 'auto', 'float32' or 'float64', got {dtype!r}."
        )
    if device.type == "mps" and dtype == "float64":
        warnings.warn("MPS does not support float64; using float32.", UserWarning)
        return torch.float32
    return _DTYPES[dtype]


def torch_generator(random_state):
    """A CPU ``torch.Generator`` seeded from ``random_state``.

    All training randomness is drawn on the CPU from this generator and then
    moved to the device, so results do not depend on the device's RNG and
    torch's global random state is never touched.
    """
    rng = check_random_state(random_state)
    seed = int(rng.randint(np.iinfo(np.int32).max))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def sampling_rng(random_state):
    """Random state for ``sample``: ``None`` means fresh OS entropy.

    Unlike ``check_random_state(None)`` this leaves numpy's global state alone.
    """
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, (numbers.Integral, np.integer)):
        return np.random.default_rng(int(random_state))
    if isinstance(random_state, (np.random.RandomState, np.random.Generator)):
        return random_state
    raise ValueError(
        f"random_state must be None, an int, a numpy RandomState or Generator; "
        f"got {random_state!r}."
    )


def standard_normal(rng, size):
    """Standard normal draws from a RandomState or a Generator."""
    return rng.standard_normal(size)


#: FLOPs of one call (a training step, a scoring chunk) per torch thread:
#: below it, the synchronisation of several threads costs more than it
#: saves, and on a machine whose other cores are busy, OpenMP threads that
#: wait for each other make small models many times slower.
FLOPS_PER_THREAD = 5e8

_THREAD_LOCK = threading.Lock()
_THREAD_USERS = 0
_THREAD_SAVED = None


def resolve_n_threads(n_threads, flops_per_call, device):
    """The torch intra-op thread count for work of ``flops_per_call`` FLOPs.

    'auto' on the CPU: one thread per ``FLOPS_PER_THREAD`` of a call, at most
    the current ``torch.get_num_threads()`` (the budget joblib, threadpoolctl
    or the user set); None keeps the current count.
    """
    current = torch.get_num_threads()
    if n_threads is None or device.type != "cpu":
        return current
    if n_threads == "auto":
        return int(max(1, min(current, flops_per_call // FLOPS_PER_THREAD)))
    return int(n_threads)


@contextmanager
def torch_threads(n):
    """Run the block with ``n`` torch intra-op threads, then restore the count.

    Nested blocks restore the count they found; blocks in concurrent threads
    of one process share the count found by the first, restored when the
    last of them leaves.
    """
    global _THREAD_USERS, _THREAD_SAVED
    with _THREAD_LOCK:
        previous = torch.get_num_threads()
        if _THREAD_USERS == 0:
            _THREAD_SAVED = previous
        _THREAD_USERS += 1
        if previous != n:
            torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREAD_LOCK:
            _THREAD_USERS -= 1
            target = _THREAD_SAVED if _THREAD_USERS == 0 else previous
            if torch.get_num_threads() != target:
                torch.set_num_threads(target)


def weighted_mean_scale(X, weights):
    """Weighted mean and standard deviation of the columns of ``X``, and
    which columns vary (a standard deviation above rounding error)."""
    w = weights / weights.sum()
    mean = w @ X
    scale = np.sqrt(w @ (X - mean) ** 2)
    varies = scale > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1)
    return mean, scale, varies
