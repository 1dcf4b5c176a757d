"""Helpers of the web-page tests: the real uvicorn server on a free loopback port, raw HTTP
requests (any header, any body), and headless Chromium through Selenium."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def raw(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (``Host`` included when given); the body is sent
    as is, with its ``Content-Length`` unless the headers give one or a ``Transfer-Encoding``."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}))
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        given = headers or {}
        if body is not None and "Content-Length" not in given and "Transfer-Encoding" not in given:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post_json(base: str, path: str, data: Any) -> tuple[int, Any]:
    status, _, body = raw(
        base, "POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed, else None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def chromium(profile: Path) -> Any:
    """Headless Chromium (Debian's, through its chromedriver) with a new empty profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    assert paths is not None
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(paths[1]))
