"""Helpers for sphinx-gallery, named by string in ``conf.py``.

Named by their fully qualified name rather than passed as objects, so that
Sphinx can cache the configuration (a callable in ``conf.py`` would make
``sphinx_gallery_conf`` unpicklable, a warning, hence an error under ``-W``).
"""

import os

#: Order of the examples in the gallery (file names in ``examples/``);
#: examples not listed come last, by name.
EXAMPLE_ORDER = [
    "plot_quickstart.py",
    "plot_mapa_intuition.py",
    "plot_mapa_posterior.py",
    "plot_non_identifiability.py",
    "plot_accuracy_vs_computation.py",
    "plot_model_selection.py",
    "plot_digits_samples.py",
]


def reset_torch(gallery_conf, fname):
    """Run every example on one torch thread (the docs machine has 2 shared cores)."""
    import torch

    torch.set_num_threads(1)


class ExampleOrder:
    """Sort key of ``within_subsection_order``: the order of ``EXAMPLE_ORDER``."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = os.path.basename(filename)
        if name in EXAMPLE_ORDER:
            return (EXAMPLE_ORDER.index(name), name)
        return (len(EXAMPLE_ORDER), name)

    def __repr__(self):
        return f"<{type(self).__name__}>"
