"""Sphinx configuration: MyST markdown pages plus an API reference from docstrings."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "polydatum"
author = "The polydatum developers"
copyright = "2026, the polydatum developers"
release = "2.0.0.dev0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "polydatum"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Integrations whose libraries may be absent when only the core docs build.
autodoc_mock_imports: list[str] = []
suppress_warnings = ["myst.xref_missing"]
