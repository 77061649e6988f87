"""serve.py's web page: HTTP behaviour on a real uvicorn server, and one headless-Chromium session
(upload, read the count, move the slider, download the zip, compare with predict.py)."""
from __future__ import annotations

import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
import train
from datasets.imageio import read_label_image
from datasets.synthetic import SyntheticSpec, render_image
from engine.predictor import Predictor
from tests.helpers import tiny_args
from utils.kaggle_rle import decode_kaggle_rle
from web.app import create_app
from web.testing import LiveServer, chromium_driver, wait_for_download
from web.uploads import Limits

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000
MAX_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    """A tiny model trained the way the trainer tests train (one step: its scores are low and
    spread, so the slider has instances to add and remove)."""
    args = tiny_args(workdir, "--epochs", "1", "--synthetic-train-images", "2", "--synthetic-val-images", "1",
                     "--eval-every", "0", "--name", "tiny", "--device", "cpu")
    train.main(train.get_args_parser().parse_args(args))
    return workdir / "runs" / "tiny" / "best.pth"


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(predictor, workdir):
    temp_root = workdir / "server-tmp"
    temp_root.mkdir()
    app = create_app(predictor, limits=Limits(MAX_BYTES, MAX_PIXELS), queue_size=8, batch_size=2,
                     temp_root=str(temp_root))
    with LiveServer(app) as live:
        yield live


def cells_png(path: Path | None = None, index: int = 0) -> bytes:
    """A 96×120 synthetic cell image as PNG bytes (written to ``path`` too when given)."""
    image = render_image(SyntheticSpec(height=96, width=120, split="val", dense_every=0), index)[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def request(server, method: str, path: str, body: bytes | None = None, chunked: bool = False,
            **params) -> tuple[int, dict, bytes]:
    """One HTTP request → (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
    if chunked:
        connection.request(method, path + query, body=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                           headers=headers, encode_chunked=True)
    else:
        connection.request(method, path + query, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


def upload(server, data: bytes, name: str, **params) -> tuple[int, dict]:
    status, _, body = request(server, "POST", "/api/predict", data, name=name, **params)
    return status, json.loads(body)


def predict_py(checkpoint: Path, image: Path, out: Path, *extra: str) -> Path:
    code = predict.main(predict.get_args_parser().parse_args(
        [str(image), "--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu", "--quiet",
         "--formats", "overlay", "labels", "json", "csv", "table", *extra]))
    assert code == 0
    return out


def server_files_left(server) -> list[Path]:
    deadline = time.monotonic() + 5           # downloads are removed just after they are sent
    while True:
        left = [p for p in server.app.state.paths["tmp"].rglob("*")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# ----------------------------------------------------------------------------- HTTP


def test_downloads_equal_predict_py_outputs(server, checkpoint, tmp_path):
    image = tmp_path / "cells.png"
    data = cells_png(image)
    for tta in (False, True):
        status, summary = upload(server, data, "cells.png", tta=int(tta), score=0.3)
        assert status == 200, summary
        assert summary["stem"] == "cells" and summary["tta"] is tta and summary["detections"] > 0
        flags = ["--score-thresh", "0.3"] + (["--tta"] if tta else [])
        expected = predict_py(checkpoint, image, tmp_path / f"predict-{tta}", *flags)
        status, headers, body = request(server, "GET", f"/api/results/{summary['id']}/files/zip", score=0.3)
        assert status == 200 and 'filename="cells.zip"' in headers["content-disposition"]
        archive = zipfile.ZipFile(io.BytesIO(body))
        assert sorted(archive.namelist()) == ["cells_instances.csv", "cells_labels.png", "cells_overlay.png",
                                              "predictions.json", "submission.csv"]
        for name in archive.namelist():
            assert archive.read(name) == (expected / name).read_bytes(), (name, tta)
        table = archive.read("cells_instances.csv").decode().splitlines()
        assert table[0] == "id,class,score,area_px,equivalent_diameter_px"
        assert len(table) - 1 == summary["count"] == int(read_label_image(expected / "cells_labels.png").max())


def test_slider_threshold_and_view_switches_need_no_model_run(server):
    status, summary = upload(server, cells_png(index=1), "b.png")
    assert status == 200
    completed = server.app.state.queue.stats.completed
    scores = sorted(row["score"] for row in summary["instances"])
    counts = {}
    for score in (0.05, 0.2, 0.3, 0.9):
        status, _, body = request(server, "GET", f"/api/results/{summary['id']}", score=score)
        counts[score] = json.loads(body)["count"]
    assert counts[0.05] >= counts[0.2] >= counts[0.3] >= counts[0.9] == 0 and counts[0.05] > 0, (counts, scores)
    status, _, plain = request(server, "GET", f"/api/results/{summary['id']}/overlay.png", score=0.05, fill=0, outline=0)
    status, _, view = request(server, "GET", f"/api/results/{summary['id']}/image.png")
    status, _, drawn = request(server, "GET", f"/api/results/{summary['id']}/overlay.png", score=0.05)
    decode = lambda data: np.array(Image.open(io.BytesIO(data)))        # noqa: E731
    assert np.array_equal(decode(plain), decode(view)) and not np.array_equal(decode(drawn), decode(view))
    assert server.app.state.queue.stats.completed == completed          # no image went through the model


def test_oversized_upload_is_413_with_a_message(server):
    too_big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES + 10)
    for chunked in (False, True):                 # declared length, and a stream counted as it arrives
        status, _, body = request(server, "POST", "/api/predict", too_big, chunked=chunked, name="huge.png")
        assert status == 413, body
        assert "huge.png" in json.loads(body)["error"] and "upload limit" in json.loads(body)["error"]


def test_image_over_the_pixel_limit_is_refused_before_decoding(server):
    buffer = io.BytesIO()
    Image.new("L", (400, 400)).save(buffer, format="PNG")       # 1.5 kB on disk, 160 000 pixels
    status, body = upload(server, buffer.getvalue(), "wide.png")
    assert status == 413 and "wide.png" in body["error"] and "pixels" in body["error"]


def test_not_an_image_corrupt_image_and_malformed_tiff(server):
    status, body = upload(server, b"just some text, not pixels\n", "notes.png")
    assert status == 415 and body["error"].startswith("notes.png: not a PNG, JPEG or TIFF image")
    status, body = upload(server, b"II*\x00" + b"\xff" * 64, "scan.tif")
    assert status == 422 and body["error"].startswith("scan.tif: malformed TIFF")
    status, body = upload(server, cells_png()[:300], "cut.png")           # valid header, truncated data
    assert status == 422 and body["error"].startswith("cut.png: ") and "readable" in body["error"]
    status, body = upload(server, cells_png(), "fine.png")                # the server goes on serving
    assert status == 200


def test_hostile_file_name_is_never_a_path_and_stays_text(server, workdir):
    name = "../../<img src=x onerror=alert(1)>.png"
    status, summary = upload(server, cells_png(), name, score=0.2)
    assert status == 200
    assert summary["name"] == name                      # shown as given: the page writes it as text
    assert re.fullmatch(r"[\w.-]+", summary["stem"]) and ".." not in summary["stem"]
    status, headers, body = request(server, "GET", f"/api/results/{summary['id']}/files/zip", score=0.2)
    assert not any(c in headers["content-disposition"] for c in "/<>")
    assert all(re.fullmatch(r"[\w.-]+", n) for n in zipfile.ZipFile(io.BytesIO(body)).namelist())
    assert not list(workdir.parent.rglob("*onerror=alert(1)*")) and not list(ROOT.rglob("*onerror=alert(1)*"))
    status, body = upload(server, b"text", "<b>x</b>.png")              # the message names it as text
    assert status == 415 and body["error"].startswith("<b>x</b>.png: ")


def test_temporary_files_are_removed(server):
    upload(server, cells_png(), "one.png")
    upload(server, b"not an image", "two.png")
    request(server, "POST", "/api/predict", b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES), chunked=True, name="big.png")
    assert server_files_left(server) == []


def test_page_and_its_assets_are_served_locally(server):
    status, headers, body = request(server, "GET", "/")
    html = body.decode()
    assert status == 200 and "script-src" not in headers["content-security-policy"]
    assert "default-src 'self'" in headers["content-security-policy"]
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert references and all(ref.startswith("/static/") for ref in references), references
    for ref in references:
        assert request(server, "GET", ref)[0] == 200, ref
    for asset in ("/static/app.js", "/static/style.css"):
        text = request(server, "GET", asset)[2].decode()
        assert "http://" not in text and "https://" not in text and "innerHTML" not in text


def test_queue_admits_a_bounded_number_of_requests(predictor, tmp_path):
    app = create_app(predictor, queue_size=1, batch_size=1, temp_root=str(tmp_path))
    with LiveServer(app) as live:
        # A client that sends its headers and then stalls holds the only slot.
        stalled = socket.create_connection(("127.0.0.1", live.port))
        stalled.sendall(b"POST /api/predict?name=slow.png HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n\x89PNG")
        deadline = time.monotonic() + 30
        while app.state.queue.stats.admitted < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, body = upload(live, cells_png(), "second.png")
        assert status == 503 and "busy" in body["error"] and "--queue-size" in body["error"]
        stalled.sendall(bytes(96))                                          # not an image: 415
        assert b" 415 " in stalled.recv(4096).split(b"\r\n")[0] + b" "
        stalled.close()
        assert upload(live, cells_png(), "third.png")[0] == 200            # the slot is free again


def test_concurrent_uploads_never_put_more_than_a_batch_in_the_model(predictor, tmp_path):
    app = create_app(predictor, queue_size=16, batch_size=2, temp_root=str(tmp_path))
    statuses = []
    with LiveServer(app) as live:
        threads = [threading.Thread(target=lambda k=k: statuses.append(upload(live, cells_png(index=k), f"{k}.png")[0]))
                   for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = app.state.queue.stats
        assert statuses == [200] * 6 and stats.completed == 6
        assert 1 <= stats.peak_in_model <= 2 and stats.admitted == 0
    assert not tmp_path.exists() or not any(tmp_path.iterdir())          # its folder is gone after shutdown


def test_serve_py_prints_its_url_and_serves(checkpoint):
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint.parent),
                                "--port", "0", "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.match(r"serving on (http://127\.0\.0\.1:(\d+)/)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        connection = http.client.HTTPConnection("127.0.0.1", int(match.group(2)), timeout=30)
        connection.request("GET", "/api/info")
        info = json.loads(connection.getresponse().read())
        assert info["class_names"] == ["round", "elongated"] and info["checkpoint"] == "tiny/best.pth"
    finally:
        process.terminate()
        process.wait(timeout=30)
    missing = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint.parent / "nope.pth")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope.pth" in missing.stderr and "Traceback" not in missing.stderr


def test_only_loopback_hosts_are_quiet():
    import serve

    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.5")


# ----------------------------------------------------------------------------- browser


def test_browser_upload_slider_download(server, checkpoint, predictor, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "cells.png"
    cells_png(image, index=2)
    hostile = tmp_path / "<img src=x onerror=document.title='pwned'>.png"
    hostile.write_text("not an image")
    # The count the page must show at each threshold: the Predictor's own answer.
    detections = predictor.predict(str(image)).detections
    count_at = {t: len(detections.above(t / 100).non_overlapping()) for t in range(5, 101)}
    start = 50
    target = max(t for t in range(5, start) if count_at[t] != count_at[start])

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(downloads)
    try:
        wait = WebDriverWait(driver, 90, poll_frequency=0.1)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("model"))
        title = driver.title
        driver.find_element(By.ID, "file-input").send_keys(f"{image}\n{hostile}")
        wait.until(lambda d: d.find_element(By.ID, "progress-text").text == "2 of 2 images done, 1 failed")
        card, failed = driver.find_elements(By.CSS_SELECTOR, ".card")
        wait.until(lambda d: card.get_attribute("data-state") == "done")
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) == 120
        assert card.find_element(By.CSS_SELECTOR, ".count").text == str(count_at[start])

        # The hostile name is shown as text; nothing it spells out ran or was inserted.
        message = failed.find_element(By.CSS_SELECTOR, ".error").text
        assert message.startswith(hostile.name + ": not a PNG, JPEG or TIFF image"), message
        assert driver.title == title and not driver.find_elements(By.CSS_SELECTOR, "img[src='x']")

        slider = driver.find_element(By.ID, "score")
        slider.click()                                  # focus; a click may move it: set it by keys
        slider.send_keys(Keys.HOME)
        slider.send_keys(*[Keys.RIGHT] * (target - 5))
        wait.until(lambda d: card.get_attribute("data-score") == f"{target / 100:.2f}"
                   and card.get_attribute("data-state") == "done")
        assert driver.find_element(By.ID, "score-value").text == f"{target / 100:.2f}"
        assert card.find_element(By.CSS_SELECTOR, ".count").text == str(count_at[target])
        rows = card.find_elements(By.CSS_SELECTOR, "table.instances tbody tr")
        assert len(rows) == count_at[target]

        driver.find_element(By.ID, "download-all").click()
        archive = zipfile.ZipFile(wait_for_download(downloads, "segmentation.zip"))
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        driver.quit()

    # What the browser downloaded decodes to the same instances as predict.py's files.
    expected = predict_py(checkpoint, image, tmp_path / "predict", "--score-thresh", f"{target / 100:.2f}")
    labels = np.array(Image.open(io.BytesIO(archive.read("cells_labels.png"))))       # 16-bit PNG
    assert np.array_equal(labels, read_label_image(expected / "cells_labels.png"))
    assert int(labels.max()) == count_at[target]
    rows = archive.read("submission.csv").decode().splitlines()[1:]
    expected_rows = (expected / "submission.csv").read_text().splitlines()[1:]
    decode = lambda rs: [decode_kaggle_rle(r.split(",")[1], 96, 120) for r in rs if r.split(",")[1]]  # noqa: E731
    assert len(decode(rows)) == count_at[target] and all(np.array_equal(a, b) for a, b in zip(decode(rows), decode(expected_rows)))
    assert archive.read("predictions.json") == (expected / "predictions.json").read_bytes()
