"""The offline bertviz page: written with local scripts, and actually drawn by a headless Chromium."""

import re
import shutil
import subprocess

import pytest
import torch
from bertviz import head_view, model_view

from course_lib import viz

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
