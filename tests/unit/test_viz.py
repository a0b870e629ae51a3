"""The offline bertviz page: written with local scripts, and actually drawn by a headless Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from bertviz import head_view, model_view
from chrome_devtools import DevTools, free_port

from course_lib.tools import viz
from course_lib.tools.paths import REPO_ROOT

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
TOKENS = ["[CLS]", "the", "animal", "was", "tired", "[SEP]"]
LAYERS, HEADS, T = 2, 3, len(TOKENS)


def attention() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.softmax(torch.randn(1, HEADS, T, T, generator=g), -1) for _ in range(LAYERS)]


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory):
    try:
        viz.asset_paths()
        return viz.DEFAULT_ASSETS_DIR
    except FileNotFoundError:
        pass
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed, so the offline copies of d3/jquery/require.js cannot be installed")
    target = tmp_path_factory.mktemp("offline-viz")
    viz.install_assets(target)
    return target


def render(page, tmp_path, *flags) -> str:
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}",
         "--proxy-server=127.0.0.1:9",  # a dead proxy: the page gets no network at all, as offline
         "--virtual-time-budget=5000", *flags, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    return result.stdout


def test_page_has_no_network_references(tmp_path, assets_dir):
    page = viz.save_bertviz_html(head_view(attention(), TOKENS, html_action="return"), tmp_path / "p.html",
                                 assets_dir)
    text = page.read_text()
    assert "cdnjs" not in text and not re.search(r"""src=["']https?:""", text)  # nothing fetched from a CDN
    assert "define('d3'" in text and "requirejs(['jquery', 'd3']" in text


def test_compact_drops_the_duplicate_data_only():
    view = head_view(attention(), TOKENS, html_action="return")
    full = view.data
    compact = viz.compact_bertviz_html(view).data
    assert full.count('"attn"') == 2 and compact.count('"attn"') == 1
    assert len(compact) < len(full) and "const params = {" in compact
    assert viz.compact_bertviz_html(full) == compact


def test_bad_input(tmp_path):
    with pytest.raises(TypeError, match="html_action='return'"):
        viz.save_bertviz_html(None, tmp_path / "p.html")
    with pytest.raises(ValueError, match="require.config"):
        viz.save_bertviz_html("<div>not bertviz</div>", tmp_path / "p.html")
    with pytest.raises(FileNotFoundError, match="install-assets"):
        viz.asset_paths(tmp_path / "empty")


def test_install_without_npm_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm was not found"):
        viz.install_assets(tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it)")
@pytest.mark.parametrize("inline", [True, False])
def test_head_view_draws_offline(tmp_path, assets_dir, inline):
    view = head_view(attention(), TOKENS, html_action="return")
    if inline:
        view = viz.compact_bertviz_html(view)  # the compacted page must draw the same
    page = viz.save_bertviz_html(view, tmp_path / "head.html", assets_dir, inline=inline)
    dom = render(page, tmp_path, "--dump-dom")
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", dom)
    assert texts == TOKENS + TOKENS  # the left and the right column of tokens
    assert dom.count("<line") == HEADS * T * T  # one line per (head, query, key) of the default layer


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it)")
def test_plain_bertviz_html_draws_nothing_offline(tmp_path):
    """The control: bertviz's own HTML needs the CDN, so without network the SVG never appears."""
    page = tmp_path / "plain.html"
    page.write_text(head_view(attention(), TOKENS, html_action="return").data)
    dom = render(page, tmp_path, "--dump-dom")
    assert "<svg" not in dom and not re.findall(r"<text[^>]*>", dom)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it)")
def test_model_view_draws_offline_and_screenshots(tmp_path, assets_dir):
    page = viz.save_bertviz_html(model_view(attention(), TOKENS, html_action="return"), tmp_path / "model.html",
                                 assets_dir)
    dom = render(page, tmp_path, "--dump-dom")
    assert dom.count("<line") == LAYERS * HEADS * T * T  # one thumbnail per (layer, head)
    render(page, tmp_path, "--window-size=900,700", f"--screenshot={tmp_path / 'shot.png'}")
    png = (tmp_path / "shot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a drawn page, not a blank one


def test_cli_reports_missing_npm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    assert viz.main(["install-assets", "--dir", str(tmp_path)]) == 1
    assert "npm was not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- views inside notebooks
NOTEBOOKS = REPO_ROOT / "notebooks"
ERROR_P = re.compile(r'<p style="color: rgb\(187, 0, 0\);">([^<]*)</p>')  # the loader's visible error


def test_offline_view_carries_its_scripts_and_nothing_from_a_cdn(assets_dir):
    view = viz.offline_view(head_view(attention(), TOKENS, html_action="return"), assets_dir)
    text = view.data
    assert text.startswith(viz.SCRIPTS_BEGIN) and text.count(viz.SCRIPTS_END) == 1
    assert "cdnjs" not in text and "require.config" not in text and "requirejs(" not in text
    assert "window.mhaBertvizLibs.then(function (libs)" in text and text.count('"attn"') == 1  # compacted
    assert viz.offline_view(head_view(attention(), TOKENS, html_action="return"), assets_dir).data.split(
        viz.SCRIPTS_END)[0] == text.split(viz.SCRIPTS_END)[0]  # the packed scripts: the same bytes every time


def test_offline_view_without_local_copies_says_where_the_scripts_come_from(tmp_path):
    text = viz.offline_view(model_view(attention(), TOKENS, html_action="return"), tmp_path / "none").data
    assert "No local copy of d3 and jQuery is installed" in text and "make viz-assets" in text
    assert viz.CDN_URLS["d3"] in text


def test_offline_view_and_its_page_refuse_what_is_not_bertviz(tmp_path):
    with pytest.raises(ValueError, match="requirejs"):
        viz.offline_view("<div>not bertviz</div>")
    with pytest.raises(TypeError, match="html_action='return'"):
        viz.offline_view(None)


def test_nbval_sees_the_same_view_with_and_without_local_copies(tmp_path, assets_dir):
    # the pairs as nbval reads them (nbval.plugin.get_sanitize_patterns)
    patterns = re.findall(r"^regex: (.*)$\n^replace: (.*)$", (REPO_ROOT / "tests" / "nbval_sanitize.cfg").read_text(),
                          flags=re.MULTILINE)

    def sanitized(text):
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    local = viz.offline_view(head_view(attention(), TOKENS, html_action="return"), assets_dir).data
    remote = viz.offline_view(head_view(attention(), TOKENS, html_action="return"), tmp_path / "none").data
    assert local != remote and sanitized(local) == sanitized(remote)


def bertviz_outputs(notebook: str) -> list[str]:
    """The text/html of every bertviz view that `notebook` was committed with."""
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    htmls = ["".join(out["data"]["text/html"]) for cell in cells for out in cell.get("outputs", [])
             if "text/html" in out.get("data", {})]
    return [h for h in htmls if 'id="bertviz-' in h]


def expected_drawing(html: str) -> tuple[list[str] | None, int]:
    """(tokens drawn, number of lines) for a view, from the data the view embeds."""
    params = json.loads(re.search(r"const params = (\{.*\});", html).group(1))
    shown = params["attention"][int(params["default_filter"])]
    attn = shown["attn"]  # (layers, heads, T, S) as nested lists
    heads, rows, cols = len(attn[0]), len(attn[0][0]), len(attn[0][0][0])
    if "MATRIX_WIDTH" not in html:  # model_view (only head_view's code has it): every (layer, head), no tokens
        return None, len(params["include_layers"]) * heads * rows * cols
    return shown["left_text"] + shown["right_text"], heads * rows * cols


def drawn_views(dom: str) -> list[tuple[list[str], int]]:
    """(texts, number of <line>s) inside each bertviz div of a rendered DOM."""
    views = []
    for part in dom.split('<div id="bertviz-')[1:]:
        part = part.split("<script")[0]  # the view's div ends before its script
        views.append((re.findall(r"<text[^>]*>([^<]*)</text>", part), part.count("<line")))
    return views


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it)")
@pytest.mark.parametrize("notebook", ["08_inside_the_heads.ipynb", "11_capstone_translation.ipynb"])
def test_notebook_views_draw_offline_in_an_html_export(tmp_path, notebook):
    """Each bertviz view of the executed notebook, exported with nbconvert, draws its tokens and its lines
    in a browser without network (the export's own CDN scripts, require.js and MathJax, fail to load)."""
    from nbconvert import HTMLExporter

    outputs = bertviz_outputs(notebook)
    assert len(outputs) == {"08_inside_the_heads.ipynb": 3, "11_capstone_translation.ipynb": 1}[notebook]
    assert all(viz.SCRIPTS_BEGIN in h and "cdnjs" not in h for h in outputs), "committed without local scripts"
    body, _ = HTMLExporter().from_filename(str(NOTEBOOKS / notebook))
    page = tmp_path / "export.html"
    page.write_text(body, encoding="utf-8")
    dom = render(page, tmp_path, "--dump-dom")
    assert not ERROR_P.findall(dom)
    drawn = drawn_views(dom)
    assert len(drawn) == len(outputs)
    for (texts, lines), html in zip(drawn, outputs, strict=True):
        tokens, n_lines = expected_drawing(html)
        if tokens is not None:
            assert texts == tokens
        assert lines == n_lines > 0


LAB_NOTEBOOK_CELLS = [
    "import torch\n"
    "from bertviz import head_view, model_view\n"
    "from IPython.display import display\n"
    "from course_lib.tools.viz import offline_view\n"
    "g = torch.Generator().manual_seed(0)\n"
    f"tokens = {TOKENS!r}\n"
    f"attention = [torch.softmax(torch.randn(1, {HEADS}, {T}, {T}, generator=g), -1) for _ in range({LAYERS})]\n"
    "display(offline_view(head_view(attention, tokens, html_action='return')))",
    "display(offline_view(model_view(attention, tokens, html_action='return')))",
    # the control: without local copies the view needs the CDN, which the blocked network refuses
    "display(offline_view(head_view(attention, tokens, html_action='return'), assets_dir='/no/such/dir'))",
]


def _wait_for_server(url: str, timeout: float) -> None:
    """Poll the JupyterLab server until it answers (its start-up takes seconds, more on a busy machine)."""
    import urllib.error
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with direct.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the JupyterLab server did not answer within {timeout:.0f} s")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it)")
def test_views_draw_in_jupyterlab_after_the_cell_runs(tmp_path, assets_dir):
    """A real JupyterLab, driven by headless Chromium without network (only the local server answers):
    run the cells as a learner would, then count the tokens and lines each view drew."""
    import nbformat

    if assets_dir != viz.DEFAULT_ASSETS_DIR:
        pytest.skip("the local copies are not installed in .offline-viz/, where the kernel looks for them")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in LAB_NOTEBOOK_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "views.ipynb")
    lab_port, devtools_port, token = free_port(), free_port(), "views-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={lab_port}",
         f"--ServerApp.token={token}", "--LabApp.expose_app_in_browser=True", "--allow-root",
         f"--ServerApp.root_dir={notebooks}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    chromium = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
         "--proxy-server=127.0.0.1:9",  # a dead proxy for everything but the loopback server
         f"--remote-debugging-port={devtools_port}", "--window-size=1200,1600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        browser = DevTools(devtools_port)
        notebook = "Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.sessionContext)"
        _wait_for_server(f"http://127.0.0.1:{lab_port}/api/status?token={token}", 180)
        for _ in range(2):  # one page load, given time on a busy machine; a second try if it got stuck
            browser.call("Page.navigate", url=f"http://127.0.0.1:{lab_port}/lab/tree/views.ipynb?token={token}")
            if browser.wait_for(f"{notebook}.sessionContext.session.kernel.status === 'idle'", 180):
                break
        else:
            pytest.fail("JupyterLab did not open the notebook with an idle kernel")
        browser.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        views = "document.querySelectorAll('.jp-OutputArea-output [id^=bertviz-]')"
        assert browser.wait_for(f"{views}.length === 3 && {views}[1].querySelectorAll('svg line').length > 0", 180)
        assert browser.wait_for("document.body.innerText.includes('bertviz could not load')", 30)
        drawn = browser.js(f"""Array.from({views}).map(v => ({{
            texts: Array.from(v.querySelectorAll('svg text')).map(t => t.textContent),
            lines: v.querySelectorAll('svg line').length,
            errors: Array.from(v.parentNode.querySelectorAll('p')).map(p => p.textContent)}}))""")
        browser.screenshot(tmp_path / "jupyterlab.png")
    finally:
        chromium.terminate()
        lab.terminate()
        chromium.wait(30)
        lab.wait(30)
    head, model, control = drawn
    assert head["texts"] == TOKENS + TOKENS and head["lines"] == HEADS * T * T and not head["errors"]
    assert model["lines"] == LAYERS * HEADS * T * T and not model["errors"]
    assert control["lines"] == 0 and any("could not load d3 and jQuery" in e for e in control["errors"])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it)")
def test_an_offline_view_saved_as_a_page_draws(tmp_path, assets_dir):
    view = viz.offline_view(head_view(attention(), TOKENS, html_action="return"), assets_dir)
    page = viz.save_bertviz_html(view, tmp_path / "view.html", tmp_path / "no-assets-needed")
    [(texts, lines)] = drawn_views(render(page, tmp_path, "--dump-dom"))
    assert texts == TOKENS + TOKENS and lines == HEADS * T * T
