"""Screenshot of the web page (serve.py) with images segmented, for the README.

    python tools/page_screenshot.py --checkpoint runs/RUN/best.pth --out docs/serve_page.png [IMAGE ...]

Serves the checkpoint on 127.0.0.1 (a free port), opens the page in headless Chromium (Debian's
``chromium`` + ``chromium-driver``), uploads the images (default: one generated dense 520×704
synthetic cell image), waits for the overlays and saves the screenshot.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from datasets.synthetic import SyntheticSpec, render_image
    from engine.predictor import Predictor
    from web.app import create_app
    from web.testing import LiveServer, chromium_driver

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="images to upload (default: a generated dense cell image)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--out", default="docs/serve_page.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        images = [Path(p).resolve() for p in args.images]
        if not images:
            image = render_image(SyntheticSpec(height=520, width=704, split="val", dense_every=1, seed=7), 0)[0]
            images = [Path(tmp) / "dense_cells.png"]
            Image.fromarray(image).save(images[0])
        predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
        checkpoint = Path(args.checkpoint)
        label = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.is_file() else checkpoint.name
        with LiveServer(create_app(predictor, checkpoint_label=label, temp_root=tmp)) as server:
            driver = chromium_driver(width=1400, height=1050)
            try:
                driver.get(server.url + "/")
                wait = WebDriverWait(driver, 600, poll_frequency=0.2)
                wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("model"))
                driver.find_element(By.ID, "file-input").send_keys("\n".join(map(str, images)))
                wait.until(lambda d: all(c.get_attribute("data-state") in ("done", "error")
                                         for c in d.find_elements(By.CSS_SELECTOR, ".card")))
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
