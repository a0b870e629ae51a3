"""A small Chrome DevTools protocol client for the tests that drive headless Chromium (bertviz's views in
JupyterLab, the website): importable because pytest puts tests/ on sys.path."""

import base64
import json
import socket
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevTools:
    """Just enough of the Chrome DevTools protocol: navigate, evaluate JavaScript, screenshots, and a record of
    every request the page makes."""

    def __init__(self, port: int, timeout: float = 60):
        import websocket  # websocket-client, which jupyter_server depends on

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        deadline = time.monotonic() + timeout
        while True:
            try:
                with direct.open(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                    tab = next(t for t in json.load(r) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.next_id = 0
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.call("Network.enable")
        self.call("Page.enable")

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            self.failed.append(f'{params["response"]["status"]} {params["response"]["url"]}')
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.failed.append(f'{params.get("errorText")} (request {params.get("requestId")})')

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def js(self, expression: str, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"):
                return True
            time.sleep(0.25)
        return False

    def open(self, url: str) -> None:
        self.requests.clear()
        self.failed.clear()
        self.call("Page.navigate", url=url)
        assert self.wait_for("document.readyState === 'complete'", 60), f"{url} did not finish loading"

    def screenshot(self, path: Path) -> None:
        """Save what the page shows now as a PNG at `path` (its folder is made if needed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
