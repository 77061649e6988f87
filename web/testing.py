"""For tests and tools: the app on a real uvicorn server in a thread, and headless Chromium.

Chromium and its driver are Debian's (``apt-get install chromium chromium-driver``; .ci/run
installs them); Selenium is pointed at both explicitly, so nothing is downloaded at run time.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


class LiveServer:
    """``with LiveServer(app) as server:`` serves ``app`` on ``server.url`` (127.0.0.1, a free
    port) until the block ends, running the app's start-up and shut-down."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host, self.port = host, 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def chromium_driver(download_dir: str | os.PathLike | None = None, width: int = 1400, height: int = 1000):
    """Headless Chromium through Selenium, with the system's browser and driver (no Selenium
    Manager download); downloads go to ``download_dir`` without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() or shutil.which(path)):
            raise RuntimeError(f"{path} not found: install it with `apt-get install -y {package}` "
                               f"(.ci/run does) or set {'CHROMIUM' if package == 'chromium' else 'CHROMEDRIVER'}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    if download_dir is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                                  "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    if download_dir is not None:
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def wait_for_download(folder: Path, name: str, timeout: float = 60) -> Path:
    """The file ``name`` in ``folder`` once the browser has finished writing it."""
    deadline = time.monotonic() + timeout
    path = folder / name
    while time.monotonic() < deadline:
        if path.is_file() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise TimeoutError(f"{name} was not downloaded into {folder} within {timeout:.0f} s "
                       f"(found: {sorted(p.name for p in folder.iterdir())})")
