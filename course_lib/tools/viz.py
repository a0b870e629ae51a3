"""Draw bertviz's attention views without network: inside a notebook, in its HTML export, and as a page.

bertviz's HTML loads require.js, d3 and jQuery from a CDN, so without internet it draws nothing. Two ways
around that, both built on local copies of the scripts:

    python -m course_lib.tools.viz install-assets            # once (make install does it when npm is present)
    view = offline_view(head_view(attention, tokens, html_action="return"))
    display(view)                                       # draws in JupyterLab and in an nbconvert HTML export
    save_bertviz_html(view, "attention.html")           # the same view as a standalone page, for any browser

`offline_view` makes the notebook output self-contained: d3 and jQuery travel inside it, gzip-compressed
(about 145 kB per view), and are unpacked by the browser, so the view draws wherever the output is shown,
with no server path and no network. Without the local copies it loads the same two libraries from the CDN
instead and says so in the output.

The libraries come from the npm registry (d3 5.7.0 and jQuery 2.2.4, the versions bertviz's code is
written for, and require.js 2.3.7 for pages made from bertviz's own HTML); they are not committed into the
repository. From bertviz's own HTML, `save_bertviz_html` inlines their code by default, so the page is one
self-contained file; `inline=False` references them by path.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from IPython.display import HTML

from course_lib.tools.cli import output_dir
from course_lib.tools.paths import REPO_ROOT

__all__ = ["DEFAULT_ASSETS_DIR", "NPM_PACKAGES", "asset_paths", "compact_bertviz_html", "install_assets",
           "offline_view", "save_bertviz_html"]

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
_REQUIREJS_CALL = re.compile(r"requirejs\(\['jquery', 'd3'\],\s*function\s*\(\$,\s*d3\)\s*\{")
# Where offline_view's views get d3 and jQuery when no local copy is installed (bertviz's own CDN).
CDN_URLS = {"d3": "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min.js",
            "jquery": "https://cdnjs.cloudflare.com/ajax/libs/jquery/2.2.4/jquery.min.js"}
# The loader is marked so that tests/nbval_sanitize.cfg can compare views made with and without local copies.
SCRIPTS_BEGIN, SCRIPTS_END = "<!-- bertviz scripts: begin -->", "<!-- bertviz scripts: end -->"


def asset_paths(assets_dir: str | Path | None = None) -> dict[str, Path]:
    """{'require': ..., 'd3': ..., 'jquery': ...}; raises FileNotFoundError (with the fix) if one is missing."""
    root = Path(assets_dir) if assets_dir is not None else DEFAULT_ASSETS_DIR
    paths = {name: root / "node_modules" / rel for name, rel in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the offline copies of bertviz's scripts are missing ({', '.join(missing)}); "
            f"run `python -m course_lib.tools.viz install-assets` (needs npm and access to the npm registry)")
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
    self-contained file) or referenced by file:// URL (inline=False). A view made by `offline_view` already
    carries its scripts and is written as it is.
    """
    text = _html_text(html)
    if text.startswith(SCRIPTS_BEGIN):
        head = ""
    else:
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


# Runs before bertviz's own script in the same output and leaves a promise of {d3, jquery} in
# window.mhaBertvizLibs, which that script (run right after it) takes. Each library runs as a CommonJS module
# (its UMD wrapper then returns its exports), so neither the page's globals nor a global require.js (classic
# Notebook, nbconvert's HTML template) are touched. One promise per source is cached for the page.
_LOADER_JS = """<script>
(function () {
  var here = document.currentScript;
  FETCH_TEXT
  function run(code) {
    var module = {exports: {}};
    new Function("module", "exports", "define", code)(module, module.exports, undefined);
    return module.exports;
  }
  function report(error) {
    var p = document.createElement("p");
    p.style.color = "#b00";
    p.textContent = "bertviz could not load d3 and jQuery (" + error + ")." + HINT;
    if (here && here.parentNode) { here.parentNode.insertBefore(p, here.nextSibling); }
  }
  var cache = window.mhaBertvizCache = window.mhaBertvizCache || {};
  if (!cache[SOURCE]) {
    cache[SOURCE] = Promise.resolve().then(function () {  // a missing browser feature rejects, never throws
      return Promise.all([fetchText("d3"), fetchText("jquery")]);
    }).then(function (codes) {
      return {d3: run(codes[0]), jquery: run(codes[1])};
    });
    cache[SOURCE].catch(function () { delete cache[SOURCE]; });
  }
  window.mhaBertvizLibs = cache[SOURCE];
  window.mhaBertvizLibs.catch(report);
})();
</script>"""
# The local copies, gzip-compressed and base64-encoded inside the output; the browser unpacks them.
_FETCH_LOCAL_JS = """function fetchText(name) {
    var bytes = Uint8Array.from(atob(PACKED[name]), function (c) { return c.charCodeAt(0); });
    return new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
  }
  var PACKED = PACKED_JSON;"""
_FETCH_CDN_JS = """function fetchText(name) {
    return fetch(URLS[name]).then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); });
  }
  var URLS = CDN_URLS_JSON;"""
_HINT = ("For views that draw without internet, run make viz-assets (or python -m course_lib.tools.viz install-assets; "
         "both need npm, which comes with Node.js), then run the cell again.")


def _packed(path: Path) -> str:
    """The file gzip-compressed (mtime 0: the same bytes every time) and base64-encoded."""
    return base64.b64encode(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0)).decode("ascii")


def _loader(assets_dir: str | Path | None) -> str:
    try:
        assets = asset_paths(assets_dir)
    except FileNotFoundError:
        assets = None
    if assets is not None:
        packed = json.dumps({"d3": _packed(assets["d3"]), "jquery": _packed(assets["jquery"])})
        fetch = _FETCH_LOCAL_JS.replace("PACKED_JSON", packed)
        source, note = "local", ""
        hint = (" This view unpacks them with the browser's DecompressionStream: Chrome 80, Firefox 113, Safari 16.4 "
                "or newer.")
    else:
        fetch = _FETCH_CDN_JS.replace("CDN_URLS_JSON", json.dumps(CDN_URLS))
        source, hint = "cdn", ""
        note = ('<p style="font-size:small;color:#777">No local copy of d3 and jQuery is installed, so this view '
                f"loads them from cdnjs (it needs internet). {_HINT}</p>")
    # the packed libraries go in last, so that no placeholder can match inside their base64 text
    js = _LOADER_JS.replace("SOURCE", json.dumps(source)).replace("HINT", json.dumps(hint))
    js = js.replace("FETCH_TEXT", fetch)
    return f"{SCRIPTS_BEGIN}{note}{js}{SCRIPTS_END}"


def offline_view(html, assets_dir: str | Path | None = None) -> HTML:
    """bertviz's view (head_view/model_view with html_action='return') as a notebook output that draws offline.

    The output is self-contained: d3 and jQuery from the local copies (`install-assets`) travel inside it,
    compressed, and bertviz's script takes them from there instead of asking require.js for the CDN's. It
    draws in JupyterLab once the cell has run (Lab runs the scripts of outputs it trusts) and in an nbconvert
    HTML export, without network and without any server path. The duplicate data in bertviz's code comment
    is dropped (`compact_bertviz_html`). Without local copies, the view fetches the same two libraries from
    the CDN and a note in the output says how to install them.
    """
    text = compact_bertviz_html(_html_text(html))
    if not (_REQUIRE_CONFIG.search(text) and _REQUIREJS_CALL.search(text)):
        raise ValueError("html does not contain bertviz's require.config(...) and requirejs(['jquery', 'd3'], ...) "
                         "calls; pass the output of bertviz.head_view/model_view(..., html_action='return')")
    text = _REQUIRE_TAG.sub("", text)
    text = _REQUIRE_CONFIG.sub("", text)
    text = _REQUIREJS_CALL.sub(lambda _: "window.mhaBertvizLibs.then(function (libs) { const $ = libs.jquery, "
                                         "d3 = libs.d3;", text)
    return HTML(_loader(assets_dir) + "\n" + text.lstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.tools.viz", description="view bertviz pages offline")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install-assets", help="npm install d3, require.js and jQuery for offline pages")
    install.add_argument("--dir", type=output_dir, default=None, help=f"target folder (default {DEFAULT_ASSETS_DIR})")
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
