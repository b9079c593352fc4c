"""What skmapa says when its requirements are not met."""
import subprocess
import sys

IMPORT = (
    "try:\n"
    "    import skmapa\n"
    "except ImportError as e:\n"
    "    print(e)\n"
    "else:\n"
    "    print('imported')\n"
)


def import_message(prelude):
    """What ``import skmapa`` prints after ``prelude`` ran, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", prelude + IMPORT], capture_output=True,
                          text=True, check=True).stdout


def test_torch_without_torch_func_is_refused_at_import():
    """torch < 2.0 has no torch.func: importing skmapa says so, not fit later."""
    out = import_message("import torch\ndel torch.func  # as in torch 1.13\n")
    assert "skmapa needs PyTorch 2.0 or later" in out
    assert "torch.func" in out


def test_torch_that_cannot_convert_numpy_arrays_is_refused_at_import():
    """torch < 2.3 beside numpy 2 cannot convert arrays: importing skmapa says so."""
    out = import_message(
        "import torch\n"
        "def numpy(self, *args, **kwargs):  # as torch 2.2 does beside numpy 2\n"
        "    raise RuntimeError('Numpy is not available')\n"
        "torch.Tensor.numpy = numpy\n"
    )
    assert "Numpy is not available" in out
    assert "need numpy < 2" in out
