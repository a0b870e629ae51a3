"""Sphinx helpers for the course's website (loaded by book/_config.yml as a local extension)."""

from typing import Any

from markdown_it.common.normalize_url import normalizeLink, normalizeLinkText


def jupyterlab_anchor(title: str) -> str:
    """The anchor JupyterLab gives a heading: its text with each space replaced by '-'.

    The notebooks link to each other's sections the way JupyterLab names them
    (`04_multi_head_attention.ipynb#1.-The-definition`), so the site names its headings the same way. A link
    target reaches MyST as markdown-it normalised it (a '%' not starting an escape becomes '%25', as in
    `#...-97.3%-is`), so the anchor is normalised the same way to match it.
    """
    return normalizeLinkText(normalizeLink(title.replace(" ", "-")))


def setup(app: Any) -> dict[str, Any]:
    return {"parallel_read_safe": True, "parallel_write_safe": True}
