"""The built website in headless Chromium with the network blocked, as a learner would see it.

Every page loads from a local server and nothing else: its title, figures and rendered math; the solutions
collapsed until clicked; a course term found by the search page; bertviz's views drawn. Screenshots go to
book/_build/screenshots/ (look at them after a change to the site).
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
import time

import pytest
from book_helpers import REPO_ROOT, SITE, build, needs_site, notebook_json
from chrome_devtools import DevTools, free_port

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
NOTEBOOKS = build.course_notebooks(REPO_ROOT / "notebooks")
SHOTS = REPO_ROOT / "book" / "_build" / "screenshots"

pytestmark = [needs_site, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs "
                                                                       "it; apt-get install chromium)")]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium")
    port = free_port()
    chromium = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         # no network: every host name but localhost fails to resolve, and anything else goes to a dead proxy
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", "--proxy-server=127.0.0.1:9",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1280,1400",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield DevTools(port)
    finally:
        chromium.terminate()
        chromium.wait(30)


def _only_local(browser: DevTools, site_url: str) -> None:
    left = [u for u in browser.requests if not u.startswith((site_url + "/", "data:", "blob:", "about:"))]
    assert not left, f"the page asked for something beyond the local site: {left[:5]}"
    failed = [f for f in browser.failed if not f.endswith("/favicon.ico")]  # the browser's own guess; the site has none
    assert not failed, f"the page failed to load: {failed[:5]}"


def _first_heading(nb: dict) -> str:
    for cell in nb["cells"]:
        match = re.search(r"(?m)^# (.+)$", "".join(cell["source"])) if cell["cell_type"] == "markdown" else None
        if match:
            return match.group(1)
    return ""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_page_loads_offline_with_title_figures_math_and_collapsed_solutions(path, browser, site_url):
    nb = notebook_json(path)
    browser.open(f"{site_url}/notebooks/{path.stem}.html")
    assert browser.js("MathJax.startup.promise.then(() => true)", await_promise=True), "MathJax did not start"
    heading = _first_heading(nb)
    title = browser.js("document.title")
    assert heading and _words(title)[: len(_words(heading))] == _words(heading), (title, heading)
    assert browser.js("document.querySelector('article h1') !== null")

    figures = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    drawn = browser.js("Array.from(document.querySelectorAll('article img'))"
                       ".filter(i => i.complete && i.naturalWidth > 0).length")
    assert drawn >= figures, f"{figures} figures in the notebook, {drawn} images drawn on the page"

    math = browser.js("""(() => {
        const all = Array.from(document.querySelectorAll('article .math'));
        const text = Array.from(document.querySelectorAll('article p, article li, article td'))
            .map(e => e.innerText).join(' ');
        return {count: all.length, raw: all.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent),
                dollars: (text.match(/\\$\\$/g) || []).length};
    })()""")
    has_tex = any("$" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert math["count"] > 0 or not has_tex, "the notebook's Markdown has $...$ but the page has no math"
    assert not math["raw"], f"math left as TeX: {math['raw'][:3]}"
    assert math["dollars"] == 0, "raw $$ left in the page's text"

    hidden = browser.js("""(() => {
        const visible = e => e.checkVisibility({contentVisibilityAuto: true, visibilityProperty: true})
                             && e.getBoundingClientRect().height > 0;
        const details = Array.from(document.querySelectorAll('article details.hide'));
        const toggles = Array.from(document.querySelectorAll('article .toggle'));
        return {details: details.length, open: details.filter(d => d.open).length,
                shown: details.filter(d => Array.from(d.children).some(c => c.tagName !== 'SUMMARY' && visible(c)))
                              .length,
                toggles: toggles.length, toggles_shown: toggles.filter(visible).length};
    })()""")
    solutions = sum(c["cell_type"] == "code" and build.collapsed(c)[0] for c in nb["cells"])
    assert hidden["details"] >= solutions and hidden["open"] == 0 and hidden["shown"] == 0, hidden
    assert hidden["toggles_shown"] == 0, hidden
    browser.screenshot(SHOTS / f"{path.stem}.png")

    if solutions:  # a click shows the first solution's code
        shown = browser.js("""(() => {
            const d = document.querySelector('article details.hide.above-input');
            d.scrollIntoView(); d.querySelector('summary').click();
            const code = d.querySelector('.cell_input');
            return d.open && code.checkVisibility() && code.getBoundingClientRect().height > 0
                   && code.innerText.includes('solution_');
        })()""")
        assert shown, "clicking a solution's toggle did not show its code"
        time.sleep(0.5)  # the theme fades the opened cell in
        browser.screenshot(SHOTS / f"{path.stem}-solution-opened.png")
    if hidden["toggles"]:
        browser.js("document.querySelector('article details.toggle-details summary').click()")
        assert browser.wait_for("document.querySelector('article .toggle').checkVisibility()", 10)
    _only_local(browser, site_url)


def test_front_page_is_the_course_map(browser, site_url):
    browser.open(f"{site_url}/index.html")
    links = browser.js("Array.from(document.querySelectorAll('article a')).map(a => a.getAttribute('href'))")
    for path in NOTEBOOKS:
        assert f"notebooks/{path.stem}.html" in links, f"the front page does not link {path.name}"
    nav = browser.js("Array.from(document.querySelectorAll('nav.bd-links a')).map(a => a.getAttribute('href'))")
    assert [h for h in nav if "notebooks/" in h] == [f"notebooks/{p.stem}.html" for p in NOTEBOOKS]
    browser.screenshot(SHOTS / "index.png")
    _only_local(browser, site_url)


def test_search_finds_a_course_term(browser, site_url):
    browser.open(f"{site_url}/search.html?q=softmax")
    assert browser.wait_for("document.querySelectorAll('#search-results ul.search li').length > 0", 60), \
        "the search page found nothing for 'softmax'"
    found = browser.js("Array.from(document.querySelectorAll('#search-results ul.search li a'))"
                       ".map(a => a.getAttribute('href'))")
    assert any("01_attention_in_numpy" in h for h in found), found[:10]
    browser.screenshot(SHOTS / "search-softmax.png")
    _only_local(browser, site_url)


BERTVIZ = [p for p in NOTEBOOKS if any("bertviz" in "".join(o.get("data", {}).get("text/html", ""))
                                       for c in notebook_json(p)["cells"] for o in c.get("outputs", []))]


@pytest.mark.parametrize("path", BERTVIZ, ids=lambda p: p.stem[:2])
def test_bertviz_views_draw(path, browser, site_url):
    browser.open(f"{site_url}/notebooks/{path.stem}.html")
    views = "document.querySelectorAll('article [id^=bertviz-]')"
    assert browser.wait_for(f"{views}.length > 0 && Array.from({views}).every("
                            "v => v.querySelectorAll('svg text').length > 0 && v.querySelectorAll('svg line, svg rect')"
                            ".length > 0)", 60), "a bertviz view did not draw"
    assert not browser.js("document.body.innerText.includes('bertviz could not load')")
    browser.js(f"{views}[0].scrollIntoView()")
    time.sleep(0.5)
    browser.screenshot(SHOTS / f"{path.stem}-bertviz.png")
    _only_local(browser, site_url)


def test_network_is_really_blocked(browser, site_url):
    """The guard the other tests rely on: a page that asks the internet for a script gets nothing."""
    browser.open(f"{site_url}/index.html")
    loaded = browser.js("""new Promise(done => { const s = document.createElement('script');
        s.src = 'https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js';
        s.onload = () => done(true); s.onerror = () => done(false); document.head.appendChild(s); })""",
                        await_promise=True)
    assert loaded is False
    with pytest.raises(AssertionError, match="beyond the local site"):
        _only_local(browser, site_url)


if os.environ.get("COURSE_BOOK_CHECK") == "1" and not BERTVIZ:
    raise RuntimeError("no notebook has bertviz views any more: update tests/book/test_book_site.py")
