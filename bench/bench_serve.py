"""Load on the web page's server: N concurrent uploads of dense 520×704 cell images.

    python bench/bench_serve.py --checkpoint runs/RUN/best.pth [--clients 20] [--batch-size 1]

Starts ``serve.py`` as its own process on 127.0.0.1 (a free port), waits for its URL, then
``--clients`` threads each upload one image (PNG, 250–400 synthetic cells) at the same moment
and wait for the answer. Reports requests completed, errors (anything but HTTP 200), latency
percentiles, the server's peak resident memory (VmHWM of its process, before and after the
load) and its queue counters; ``--json FILE`` writes them. Only the loopback address is used
and every request is bounded by ``--timeout``.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dense_pngs(count: int, height: int, width: int) -> list[bytes]:
    """``count`` distinct dense synthetic images as PNG bytes."""
    from PIL import Image

    from datasets.synthetic import SyntheticSpec, render_image

    spec = SyntheticSpec(height=height, width=width, split="val", dense_every=1, seed=7)
    out = []
    for k in range(count):
        buffer = io.BytesIO()
        Image.fromarray(render_image(spec, k)[0]).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of process ``pid`` (Linux ``VmHWM``), MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def get_json(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    data = json.loads(connection.getresponse().read())
    connection.close()
    return data


def upload(port: int, data: bytes, name: str, timeout: float) -> tuple[int, float, int]:
    """POST one image → (HTTP status or 0 on a connection error, seconds, instances)."""
    start = time.perf_counter()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("POST", f"/api/predict?name={name}", body=data,
                           headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        return response.status, time.perf_counter() - start, int(body.get("count", -1))
    except (OSError, ValueError):
        return 0, time.perf_counter() - start, -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=20, help="concurrent uploads")
    parser.add_argument("--batch-size", type=int, default=1, help="serve.py --batch-size")
    parser.add_argument("--height", type=int, default=520)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per request at most")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    images = dense_pngs(args.clients, args.height, args.width)
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", args.checkpoint, "--port", "0",
                               "--device", args.device, "--batch-size", str(args.batch_size),
                               "--queue-size", str(max(64, args.clients))],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            print(f"error: serve.py did not start (it printed {line!r})", file=sys.stderr)
            return 2
        port = int(match.group(1))
        upload(port, images[0], "warmup.png", args.timeout)           # first forward pass: allocations
        idle_rss = peak_rss_mb(server.pid)
        results: list[tuple[int, float, int]] = [None] * args.clients  # type: ignore[list-item]
        barrier = threading.Barrier(args.clients)

        def client(k: int) -> None:
            barrier.wait()
            results[k] = upload(port, images[k], f"dense{k}.png", args.timeout)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        stats = get_json(port, "/api/stats")
        peak_rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)

    latencies = np.array([r[1] for r in results])
    ok = [r for r in results if r[0] == 200]
    report = {
        "clients": args.clients, "image": f"{args.width}x{args.height}", "batch_size": args.batch_size,
        "completed": len(ok), "errors": args.clients - len(ok),
        "statuses": sorted({r[0] for r in results}),
        "instances_per_image": [int(np.min([r[2] for r in ok])), int(np.max([r[2] for r in ok]))] if ok else None,
        "wall_s": round(wall, 2), "throughput_img_per_s": round(len(ok) / wall, 3),
        "latency_s": {f"p{q}": round(float(np.percentile(latencies, q)), 2) for q in (50, 90, 95, 99)}
        | {"max": round(float(latencies.max()), 2)},
        "server_peak_rss_mb": {"after_warmup": round(idle_rss), "after_load": round(peak_rss)},
        "queue": {k: stats[k] for k in ("peak_admitted", "peak_in_model", "completed", "failed", "rejected")},
        "cpu": cpu_model(), "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["errors"] == 0 else 1


def cpu_model() -> str:
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
