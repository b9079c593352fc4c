"""Sphinx configuration of the skmapa documentation.

Build (from the repository root; warnings are errors):

    sphinx-build -W --keep-going -b html docs docs/_build/html

``-D plot_gallery=0`` skips running the gallery examples (a fast build for
editing prose).
"""

import importlib
import os
import pkgutil
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # gallery_utils, named by string below

import skmapa  # noqa: E402

# -- project -----------------------------------------------------------------
project = "skmapa"
author = "skmapa developers"
copyright = "2026, skmapa developers"
release = skmapa.__version__
version = ".".join(release.split(".")[:2])

# -- extensions ----------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
default_role = "literal"
pygments_style = "sphinx"

# autosummary writes one page per public object into gen_modules/ (ignored).
autosummary_generate = True
autodoc_typehints = "none"

# numpydoc: the class template lists the methods itself.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- gallery -----------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": os.path.join("..", "examples"),
    "gallery_dirs": "auto_examples",
    # plot_*.py run and are shown; quickstart.py is the README's main job,
    # run from the command line, and not part of the gallery.
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"(^|/)quickstart\.py$|__init__\.py",
    "within_subsection_order": "gallery_utils.ExampleOrder",
    "reset_modules": ("matplotlib", "gallery_utils.reset_torch"),
    "doc_module": ("skmapa",),
    "backreferences_dir": os.path.join("gen_modules", "backreferences"),
    "remove_config_comments": True,
    "download_all_examples": False,
    "show_signature": False,
    "min_reported_time": 1,
    "matplotlib_animations": False,
}

# -- HTML ----------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"skmapa {release}"
html_static_path = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": [], "install": [], "getting_started": [], "changelog": []}
html_show_sourcelink = False

# -- the API reference must list every public name -----------------------------

#: Public modules whose objects are documented under the top-level package
#: (``skmapa.MAPADensity`` rather than ``skmapa.mapa.MAPADensity``).
REEXPORTED_MODULES = {"skmapa.mapa", "skmapa.vae", "skmapa.iwae"}


def _public_names():
    """Every public name: ``skmapa.__all__`` and each public module's ``__all__``."""
    names = {f"skmapa.{n}" for n in skmapa.__all__ if not n.startswith("__")}
    modules = []
    for info in pkgutil.iter_modules(skmapa.__path__):
        if info.name.startswith("_"):
            continue
        module_name = f"skmapa.{info.name}"
        modules.append(module_name)
        if module_name in REEXPORTED_MODULES:
            continue
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None)
        if public is None:
            public = [
                n for n, obj in vars(module).items()
                if not n.startswith("_")
                and getattr(obj, "__module__", None) == module_name
            ]
        names.update(f"{module_name}.{n}" for n in public)
    return sorted(names), sorted(m for m in modules if m not in REEXPORTED_MODULES)


def check_api_reference(app):
    """Warn (an error under -W) for a public name missing from api.rst."""
    from sphinx.util import logging

    logger = logging.getLogger("skmapa.docs")
    with open(os.path.join(HERE, "api.rst"), encoding="utf-8") as fh:
        text = fh.read()
    documented = set()
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*\.\. currentmodule:: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s{3,}(\w+)\s*$", line)
        if m and current:
            documented.add(f"{current}.{m.group(1)}")
    names, modules = _public_names()
    missing = [n for n in names if n not in documented]
    for name in missing:
        logger.warning(
            f"{name} is public but not listed in docs/api.rst; add it to the "
            "API reference."
        )
    for module in modules:
        if f".. currentmodule:: {module}" not in text:
            logger.warning(f"the public module {module} has no section in docs/api.rst.")


BENCHMARKS_README = os.path.join(ROOT, "benchmarks", "README.md")


def add_benchmarks_readme(app, docname, source):
    """Show benchmarks/README.md (when it exists) on the benchmarks page, verbatim."""
    if docname != "benchmarks":
        return
    # rebuild the page when the README appears or changes
    app.env.note_dependency(BENCHMARKS_README)
    if os.path.exists(BENCHMARKS_README):
        source[0] += (
            "\n.. literalinclude:: ../benchmarks/README.md\n"
            "   :language: markdown\n"
        )
    else:
        source[0] += (
            "\n*This checkout has no* ``benchmarks/README.md`` *yet.*\n"
        )


_SKLEARN_ROLE = re.compile(r":(ref|term):`([^`<]*?)\s*(<[^`>]*>)?`")


def _role_text(match):
    role, text, target = match.groups()
    if role == "ref" and not target:
        return "scikit-learn's documentation"  # a bare label: no readable text
    return text.strip()


def strip_sklearn_cross_references(app, what, name, obj, options, lines):
    """Inherited scikit-learn methods refer to labels of scikit-learn's own docs.

    ``set_output``, ``get_metadata_routing`` and the ``set_*_request``
    methods come from scikit-learn with ``:ref:`` and ``:term:`` roles that
    only resolve there: keep their text, drop the link.
    """
    if not str(getattr(obj, "__module__", "")).startswith("sklearn"):
        return
    for i, line in enumerate(lines):
        lines[i] = _SKLEARN_ROLE.sub(_role_text, line)


def setup(app):
    app.connect("autodoc-process-docstring", strip_sklearn_cross_references)
    app.connect("builder-inited", check_api_reference)
    app.connect("source-read", add_benchmarks_readme)
