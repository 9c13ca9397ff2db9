"""Load test of the service: raw engine throughput vs what the HTTP service delivers, measured in one run.

    python scripts/load_test.py package=models/package [serve.load_test.duration_s=20 ...]

1. Raw engine (same package, same settings): ONNX Runtime img/s at batch 32, batch-1 model latency, and
   decode + preprocess time of one photo.
2. For each scenario, a fresh server (uvicorn, ``serve.*`` settings) on 127.0.0.1 and locust headless in a
   subprocess (locust's gevent monkey-patching stays out of this process): one user sending single photos
   (latency), many users sending single photos with micro-batching on and off (throughput), and the batch
   endpoint.
3. Writes RPS, img/s, p50/p95/p99 and errors to the ``## Serving`` section of ``serve.load_test.report``
   (other sections of that file are left as they are) and prints the table.

The load generator shares the machine's cores with the server, so served numbers are a lower bound.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from leaflens.config import load_config
from leaflens.images import decode_image
from leaflens.logs import logger
from leaflens.preprocessing import preprocess
from leaflens.serving.api import ServeSettings, batch_concurrency
from leaflens.serving.engine import InferenceEngine
from leaflens.serving.server import background_server, settings_from_config

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
SECTION = "## Serving"


def sample_photos(root: Path) -> list[Path]:
    photos = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not photos:
        raise SystemExit(f"no photos under {root}")
    return photos


def raw_engine(
    package: Path, photos: list[Path], settings: ServeSettings, seconds: float
) -> dict[str, float]:
    """Engine only: p50 batch-1 model latency, p50 decode + preprocess of a photo, and ORT img/s at batch 32:
    the better of one call on all cores and of the service's own threading (``batch_concurrency`` calls in
    parallel with ``num_threads`` each)."""
    engine = InferenceEngine.from_package(package, threads=settings.num_threads or None)
    blobs = [p.read_bytes() for p in photos]
    rgbs = [decode_image(b) for b in blobs[:32]]
    batch = np.stack([preprocess(rgb, engine.spec) for rgb in rgbs]).astype(np.float32)

    all_cores = InferenceEngine.from_package(package)  # ONNX Runtime's default threading
    batch_img_s = max(
        _throughput(all_cores, batch, seconds, parallel=1),
        _throughput(engine, batch, seconds, parallel=batch_concurrency(settings)),
    )

    single = batch[:1]
    model_ms = []
    for _ in range(200):
        t0 = time.perf_counter()
        engine.infer(single)
        model_ms.append((time.perf_counter() - t0) * 1000)
    decode_ms = []
    for blob in blobs[:200]:
        t0 = time.perf_counter()
        preprocess(decode_image(blob), engine.spec)
        decode_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "batch": float(len(batch)),
        "batch_img_s": batch_img_s,
        "model_bs1_ms": float(np.median(model_ms)),
        "decode_ms": float(np.median(decode_ms)),
    }


def _throughput(engine: InferenceEngine, batch: np.ndarray, seconds: float, parallel: int) -> float:
    """img/s of ``parallel`` threads each running ``engine.infer(batch)`` back to back for ``seconds``."""
    for _ in range(3):  # warm-up: graph optimisation, thread pools, page faults
        engine.infer(batch)
    runs = [0] * parallel
    stop = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        while time.perf_counter() < stop:
            engine.infer(batch)
            runs[slot] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(loop, range(parallel)))
    return sum(runs) * len(batch) / (time.perf_counter() - start)


def run_locust(
    url: str, user_class: str, users: int, seconds: int, batch_files: int, photos_dir: Path
) -> dict:
    """Run locust headless against ``url``; the aggregated row of its CSV stats."""
    env = {**os.environ, "LEAFLENS_LOAD_IMAGES": str(photos_dir), "LEAFLENS_LOAD_BATCH": str(batch_files)}
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "10",
            "--host", url, "--csv", f"{tmp}/run", "--loglevel", "WARNING", user_class,
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 180)
        stats_path = Path(f"{tmp}/run_stats.csv")
        if not stats_path.is_file():
            raise RuntimeError(f"locust wrote no statistics (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rows = list(csv.DictReader(stats_path.open()))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rps": float(total["Requests/s"]),
        "p50": float(total["50%"]),
        "p95": float(total["95%"]),
        "p99": float(total["99%"]),
        "seconds": seconds,
    }


def batch_stats(url: str) -> float:
    """Mean images per engine call so far, from the server's own /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    values = dict(re.findall(r"^(leaflens_batch_size_(?:sum|count)) ([0-9.e+]+)$", text, flags=re.MULTILINE))
    count = float(values.get("leaflens_batch_size_count", 0))
    return float(values.get("leaflens_batch_size_sum", 0)) / count if count else float("nan")


def scenario(
    name,
    package,
    settings,
    user_class,
    users,
    seconds,
    batch_files,
    photos_dir,
    images_per_request,
    workers=1,
):
    logger.info("Scenario {}: {} x {} for {} s, {} worker(s)", name, users, user_class, seconds, workers)
    with background_server(package, settings, workers=workers) as url:
        result = run_locust(url, user_class, users, seconds, batch_files, photos_dir)
        result["mean_batch"] = batch_stats(url)
    result.update(name=name, users=users, img_s=result["rps"] * images_per_request)
    logger.info(
        "  {:.1f} req/s, {:.1f} img/s, p50 {} ms, failures {}",
        *(result[k] for k in ("rps", "img_s", "p50", "failures")),
    )
    return result


def render(package: Path, raw: dict, runs: list[dict], settings: ServeSettings, lt, workers: int) -> str:
    latency = runs[0]
    best_single = max((r for r in runs if r["name"].startswith("single")), key=lambda r: r["img_s"])
    best_any = max(runs, key=lambda r: r["img_s"])
    on, off = runs[1], runs[2]
    budget = 2 * (raw["model_bs1_ms"] + raw["decode_ms"])
    errors = sum(r["failures"] for r in runs)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [
        SECTION,
        "",
        f"Measured by `scripts/load_test.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), load average before the run "
        f"{raw['load_before']:.1f} and after {os.getloadavg()[0]:.1f} (other jobs share the machine), "
        f"onnxruntime {ort.__version__}, package `{package}`. {workers} uvicorn worker(s); locust runs on "
        "the same cores, so served numbers are a lower bound. Service settings: "
        f"{settings.num_threads or 'all'} ONNX Runtime thread(s) per call, "
        f"{batch_concurrency(settings)} batch(es) in flight, micro-batching "
        f"up to {settings.max_batch_size} images, max wait {settings.max_wait_ms:g} ms.",
        "",
        "| engine only (same package, same run) | value |",
        "|---|---|",
        f"| ONNX Runtime batch {int(raw['batch'])} | {raw['batch_img_s']:.1f} img/s |",
        f"| model latency, batch 1 (p50) | {raw['model_bs1_ms']:.2f} ms |",
        f"| decode + preprocess one photo (p50) | {raw['decode_ms']:.2f} ms |",
        "",
        "| scenario | users | requests | errors | req/s | img/s | p50 ms | p95 ms | p99 ms "
        "| mean engine batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']} | {r['users']} | {r['requests']} | {r['failures']} | {r['rps']:.1f} "
            f"| {r['img_s']:.1f} "
            f"| {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.1f} |"
        )
    lines += [
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        "| served img/s >= 80 % of raw batch throughput (single-photo requests) "
        f"| {best_single['img_s']:.1f} / "
        f"{raw['batch_img_s']:.1f} = {best_single['img_s'] / raw['batch_img_s']:.0%} | "
        f"{verdict(best_single['img_s'] >= 0.8 * raw['batch_img_s'])} |",
        f"| same, best of all scenarios ({best_any['name']}) "
        f"| {best_any['img_s']:.1f} / {raw['batch_img_s']:.1f} = "
        f"{best_any['img_s'] / raw['batch_img_s']:.0%} "
        f"| {verdict(best_any['img_s'] >= 0.8 * raw['batch_img_s'])} |",
        f"| 0 errors | {errors} | {verdict(errors == 0)} |",
        f"| single-request p50 <= 2 x (model + decode) | {latency['p50']:.0f} ms vs {budget:.1f} ms | "
        f"{verdict(latency['p50'] <= budget)} |",
        f"| what micro-batching buys ({on['users']} users) | {on['img_s']:.1f} vs {off['img_s']:.1f} img/s "
        f"(x{on['img_s'] / max(off['img_s'], 1e-9):.2f}); p50 {on['p50']:.0f} vs {off['p50']:.0f} ms | - |",
        "",
        "Locust reports latencies rounded to 2 significant digits (ms). Rerun: "
        f"`python scripts/load_test.py package=<dir> serve.load_test.duration_s={lt.duration_s} "
        f"serve.load_test.users={lt.users}`.",
        "",
    ]
    return "\n".join(lines)


def write_section(report: Path, section: str) -> None:
    """Replace the ``## Serving`` section of ``report`` (or append it), keeping every other section."""
    text = report.read_text() if report.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", flags=re.MULTILINE | re.DOTALL)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + section
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text.rstrip("\n") + "\n")


def main(overrides: list[str]) -> None:
    cfg = load_config(overrides, task_name="load_test")
    if not cfg.get("package"):
        raise SystemExit("give the model package: python scripts/load_test.py package=<dir>")
    package = Path(str(cfg.package)).resolve()
    lt = cfg.serve.load_test
    # No drift summaries from synthetic load: they would pollute the store the drift report reads.
    settings = replace(settings_from_config(cfg.serve), summaries_path=None)
    photos_dir = Path(str(cfg.data.source))
    photos = sample_photos(photos_dir)
    seconds = int(lt.duration_s)

    load_before = os.getloadavg()[0]
    raw = raw_engine(package, photos, settings, float(lt.engine_seconds))
    raw["load_before"] = load_before
    logger.info("Raw engine: {:.1f} img/s at batch 32; batch-1 {:.2f} ms; decode {:.2f} ms",
                raw["batch_img_s"],
                raw["model_bs1_ms"], raw["decode_ms"])  # fmt: skip
    off = replace(settings, max_batch_size=1)
    waiting = replace(settings, max_wait_ms=max(5.0, settings.max_wait_ms))
    common = {
        "package": package,
        "seconds": seconds,
        "batch_files": int(lt.batch_files),
        "photos_dir": photos_dir,
        "workers": int(cfg.serve.workers),
    }
    runs = [
        scenario("single photo, 1 user (latency)", settings=settings, user_class="SingleImageUser", users=1,
                 images_per_request=1, **common),
        scenario("single photos, micro-batching on", settings=settings, user_class="SingleImageUser",
                 users=int(lt.users), images_per_request=1, **common),
        scenario("single photos, micro-batching off", settings=off, user_class="SingleImageUser",
                 users=int(lt.users), images_per_request=1, **common),
        scenario(f"single photos, micro-batching on, wait {waiting.max_wait_ms:g} ms", settings=waiting,
                 user_class="SingleImageUser", users=int(lt.users), images_per_request=1, **common),
        scenario(f"batch endpoint, {int(lt.batch_files)} photos/request", settings=settings,
                 user_class="BatchUser",
                 users=int(lt.batch_users), images_per_request=int(lt.batch_files), **common),
    ]  # fmt: skip
    section = render(package, raw, runs, settings, lt, int(cfg.serve.workers))
    write_section(Path(str(lt.report)), section)
    print(section)


if __name__ == "__main__":
    main(sys.argv[1:])
