"""MkDocs hooks and a griffe extension of the docs site (``mkdocs.yml``).

* The home page is the repository's README: ``docs/index.md`` is a stub that
  :func:`on_page_markdown` replaces with ``README.md``, whose links point into ``docs/``
  (``docs/actions.md``) and become site-relative (``actions.md``).
* The docstrings use Google style with a singular ``Example:`` heading, which griffe reads as an
  admonition rather than an examples section; :class:`ExampleSections` renames it to
  ``Examples:`` so doctests render as code.
"""

from __future__ import annotations

import os
import re
from typing import Any

from griffe import Extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def readme_for_site(text: str) -> str:
    """README text with its ``docs/...`` links made relative to the docs folder.

    Example:
        >>> readme_for_site("[Actions](docs/actions.md) ![x](docs/report-screenshot.png)")
        '[Actions](actions.md) ![x](report-screenshot.png)'
    """
    return re.sub(r"\]\(docs/", "](", text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Serve README.md as the home page."""
    if page.file.src_uri == "index.md":
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
            return readme_for_site(fh.read())
    return markdown


_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(Extension):
    """Read a Google-style ``Example:`` heading as ``Examples:`` (griffe knows only the plural)."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _EXAMPLE.sub(r"\1Examples:", docstring.value)
