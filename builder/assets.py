"""Where builder's data files are: the Dockerfile templates, in the source tree or in an installed copy.

The templates live in the top-level templates/ of the source tree; a wheel ships them as the package data
builder/templates/ (pyproject.toml maps one onto the other). Standard library only: uptodate.py imports it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# An installed wheel: builder/templates beside this file. A checkout (or an editable install): ../templates.
INSTALLED_TEMPLATES = PACKAGE / "templates"
SOURCE_TEMPLATES = PACKAGE.parent / "templates"
TEMPLATES = INSTALLED_TEMPLATES if (INSTALLED_TEMPLATES / "Dockerfile.j2").is_file() else SOURCE_TEMPLATES
