"""View bertviz's attention visualizations offline.

bertviz's HTML loads require.js, d3 and jQuery from a CDN, so without internet it draws nothing.
`save_bertviz_html` writes a standalone page whose three scripts are local copies instead:

    python -m course_lib.viz install-assets            # once: npm installs the three libraries into .offline-viz/
    html = head_view(attention, tokens, html_action="return")
    save_bertviz_html(html, "attention.html")           # open the file in any browser, no network needed

The libraries come from the npm registry (d3 5.7.0 and jQuery 2.2.4, the versions bertviz's code is
written for, and require.js 2.3.7); they are not committed into the repository. By default their code is
inlined into the page, so the page is one self-contained file; `inline=False` references them by path.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from course_lib.paths import REPO_ROOT

__all__ = ["DEFAULT_ASSETS_DIR", "NPM_PACKAGES", "asset_paths", "compact_bertviz_html", "install_assets",
           "save_bertviz_html"]

DEFAULT_ASSETS_DIR = REPO_ROOT / ".offline-viz"
NPM_PACKAGES = ("d3@5.7.0", "requirejs@2.3.7", "jquery@2.2.4")
_FILES = {  # library -> path inside <assets_dir>/node_modules
    "require": "requirejs/require.js",
    "d3": "d3/dist/d3.min.js",
    "jquery": "jquery/dist/jquery.min.js",
}
_REQUIRE_TAG = re.compile(r'<script src="https://[^"]*require(?:\.min)?\.js"></script>')
_DUPLICATE_PARAMS = re.compile(r"; // HACK: .* is a template marker that is replaced by actual params\.")
_REQUIRE_CONFIG = re.compile(r"require\.config\(\{\s*paths:\s*\{[^}]*\}\s*\}\);")


def asset_paths(assets_dir: str | Path | None = None) -> dict[str, Path]:
    """{'require': ..., 'd3': ..., 'jquery': ...}; raises FileNotFoundError (with the fix) if one is missing."""
    root = Path(assets_dir) if assets_dir is not None else DEFAULT_ASSETS_DIR
    paths = {name: root / "node_modules" / rel for name, rel in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the offline copies of bertviz's scripts are missing ({', '.join(missing)}); "
            f"run `python -m course_lib.viz install-assets` (needs npm and access to the npm registry)")
    return paths


def install_assets(assets_dir: str | Path | None = None, npm: str | None = None) -> dict[str, Path]:
    """`npm install` d3, require.js and jQuery into assets_dir (default .offline-viz/, git-ignored)."""
    root = Path(assets_dir) if assets_dir is not None else DEFAULT_ASSETS_DIR
    npm = npm or shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm was not found on PATH: install Node.js (which ships npm), e.g. "
                           "`conda install nodejs` or your system's nodejs package, then run this again")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", "--no-save", *NPM_PACKAGES],
                   check=True)
    return asset_paths(root)


def _html_text(html) -> str:
    if isinstance(html, str):
        return html
    data = getattr(html, "data", None)  # IPython.display.HTML, as returned by html_action="return"
    if isinstance(data, str):
        return data
    raise TypeError(f"html must be a str or the IPython HTML object bertviz returns with html_action='return'; "
                    f"got {type(html).__name__} (did you call head_view/model_view without html_action='return'?)")


def compact_bertviz_html(html):
    """bertviz writes its whole data twice (once more in a code comment); drop the copy in the comment.

    Returns the same kind of object it was given (str or IPython HTML); the page draws the same.
    """
    text = _DUPLICATE_PARAMS.sub(";", _html_text(html))
    if isinstance(html, str):
        return text
    html.data = text
    return html


def _script(path: Path, inline: bool) -> str:
    if inline:
        code = path.read_text(encoding="utf-8").replace("</script", "<\\/script")
        return f"<script>\n{code}\n</script>"
    return f'<script src="{path.resolve().as_uri()}"></script>'


def save_bertviz_html(html, path: str | Path, assets_dir: str | Path | None = None, *, inline: bool = True,
                      title: str = "bertviz") -> Path:
    """Write bertviz's HTML (head_view/model_view with html_action='return') as a page that works offline.

    The CDN <script> for require.js is removed, bertviz's `require.config` (which points d3 and jquery at
    the CDN) is emptied, and the local copies are loaded in the page's <head>: inlined (the default, one
    self-contained file) or referenced by file:// URL (inline=False).
    """
    text = _html_text(html)
    if not _REQUIRE_CONFIG.search(text):
        raise ValueError("html does not contain bertviz's require.config(...) block; pass the output of "
                         "bertviz.head_view/model_view(..., html_action='return')")
    assets = asset_paths(assets_dir)
    text = _REQUIRE_TAG.sub("", text)
    # d3 and jQuery are loaded first as plain scripts (no AMD loader yet, so they set window.d3 and
    # window.jQuery), then require.js, then two named modules that hand those globals to bertviz's
    # requirejs(['jquery', 'd3'], ...) call. bertviz's CDN paths are dropped.
    shim = ("<script>define('d3', [], function () { return window.d3; });\n"
            "define('jquery', [], function () { return window.jQuery; });</script>")
    head = "\n".join([_script(assets["d3"], inline), _script(assets["jquery"], inline),
                      _script(assets["require"], inline), shim])
    text = _REQUIRE_CONFIG.sub(lambda _: "require.config({ paths: {} });", text)
    page = (f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n{head}\n</head>\n'
            f"<body>\n{text}\n</body>\n</html>\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.viz", description="view bertviz pages offline")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install-assets", help="npm install d3, require.js and jQuery for offline pages")
    install.add_argument("--dir", type=Path, default=None, help=f"target folder (default {DEFAULT_ASSETS_DIR})")
    args = parser.parse_args(argv)
    try:
        paths = install_assets(args.dir)
    except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
