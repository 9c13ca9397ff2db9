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
    """Engine only: p50 batch-1 model latency, p50 decode + preprocess of a photo, and the best ORT img/s over
    batch 1, the service's ``max_batch_size`` and 32, each the better of one call on all cores and of the
    service's own threading (``batch_concurrency`` calls in parallel with ``num_threads`` each). Bigger is not
    always faster per image: a graph with test-time flips runs four views per photo and costs more per image
    at batch 32 than at batch 1 on a small CPU, so batch 32 alone would understate what the engine can do."""
    engine = InferenceEngine.from_package(package, threads=settings.num_threads or None)
    blobs = [p.read_bytes() for p in photos]
    rgbs = [decode_image(b) for b in blobs[:32]]
    batch = np.stack([preprocess(rgb, engine.spec) for rgb in rgbs]).astype(np.float32)

    all_cores = InferenceEngine.from_package(package)  # ONNX Runtime's default threading
    img_s_by_batch = {
        size: max(
            _throughput(all_cores, batch[:size], seconds, parallel=1),
            _throughput(engine, batch[:size], seconds, parallel=batch_concurrency(settings)),
        )
        for size in sorted({1, min(settings.max_batch_size, len(batch)), len(batch)})
    }
    best_batch = max(img_s_by_batch, key=img_s_by_batch.__getitem__)

    single = batch[:1]
    model_ms = []
    cpu0 = time.process_time()
    for _ in range(200):
        t0 = time.perf_counter()
        engine.infer(single)
        model_ms.append((time.perf_counter() - t0) * 1000)
    model_bs1_cpu_ms = (time.process_time() - cpu0) * 1000 / len(model_ms)
    decode_ms = []
    cpu0 = time.process_time()
    for blob in blobs[:200]:
        t0 = time.perf_counter()
        preprocess(decode_image(blob), engine.spec)
        decode_ms.append((time.perf_counter() - t0) * 1000)
    decode_cpu_ms = (time.process_time() - cpu0) * 1000 / len(decode_ms)
    # CPU time (all threads) per image of the service's engine at the batch sizes it runs, as a yardstick for
    # the server's CPU per request (wall times here depend on what else the machine is doing).
    cpu0, runs = time.process_time(), 20
    for _ in range(runs):
        engine.infer(batch)
    model_cpu_ms = (time.process_time() - cpu0) * 1000 / (runs * len(batch))
    return {
        "batch": float(len(batch)),
        "batch_img_s": img_s_by_batch[best_batch],
        "best_batch": float(best_batch),
        "img_s_by_batch": img_s_by_batch,
        "model_bs1_ms": float(np.median(model_ms)),
        "decode_ms": float(np.median(decode_ms)),
        "model_cpu_ms": model_cpu_ms,
        "model_bs1_cpu_ms": model_bs1_cpu_ms,
        "decode_cpu_ms": decode_cpu_ms,
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


def server_metrics(url: str) -> dict[str, float]:
    """Engine calls, images and the server process's CPU seconds so far, from the server's own /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    pattern = r"^(leaflens_batch_size_sum|leaflens_batch_size_count|process_cpu_seconds_total) ([0-9.e+]+)$"
    return {name: float(value) for name, value in re.findall(pattern, text, flags=re.MULTILINE)}


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
    kind="",
):
    logger.info("Scenario {}: {} x {} for {} s, {} worker(s)", name, users, user_class, seconds, workers)
    with background_server(package, settings, workers=workers) as url:
        before = server_metrics(url)
        result = run_locust(url, user_class, users, seconds, batch_files, photos_dir)
        after = server_metrics(url)
    calls = after["leaflens_batch_size_count"] - before["leaflens_batch_size_count"]
    images = after["leaflens_batch_size_sum"] - before["leaflens_batch_size_sum"]
    result["mean_batch"] = images / calls if calls else float("nan")
    # CPU of one worker process; with several workers this undercounts, so it is only reported for one.
    cpu = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
    result["cpu_ms_per_image"] = 1000 * cpu / images if images and workers == 1 else float("nan")
    result.update(name=name, kind=kind, users=users, img_s=result["rps"] * images_per_request)
    logger.info(
        "  {:.1f} req/s, {:.1f} img/s, p50 {} ms, failures {}",
        *(result[k] for k in ("rps", "img_s", "p50", "failures")),
    )
    return result


def render(package: Path, raw: dict, runs: list[dict], settings: ServeSettings, lt, workers: int) -> str:
    latency = runs[0]
    batch_endpoint = runs[-1]
    on = _mean([r for r in runs if r["kind"] == "on"])
    off = _mean([r for r in runs if r["kind"] == "off"])
    budget = 2 * (raw["model_bs1_ms"] + raw["decode_ms"])
    # The model's CPU per image at its cheaper batch size (1 or 32) is the least any request can cost.
    model_ms = min(raw["model_bs1_cpu_ms"], raw["model_cpu_ms"])
    engine_share = (model_ms + raw["decode_cpu_ms"]) / on["cpu_ms_per_image"]
    errors = sum(r["failures"] for r in runs)
    # What the cores could serve if HTTP and the load generator cost nothing: every image still needs its
    # decode + preprocess on top of the model time that the raw number is made of.
    ceiling = (os.cpu_count() or 1) * 1000.0 / (model_ms + raw["decode_cpu_ms"])

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
        "| ONNX Runtime img/s by batch size, before the load | "
        + ", ".join(f"batch {size}: {img_s:.1f}" for size, img_s in raw["img_s_by_batch"].items())
        + " |",
        f"| raw throughput: the best batch size (mean of before / after the load: "
        f"{raw['batch_img_s_runs'][0]:.1f} / {raw['batch_img_s_runs'][1]:.1f}) "
        f"| {raw['batch_img_s']:.1f} img/s |",
        f"| model latency, batch 1 (p50) | {raw['model_bs1_ms']:.2f} ms |",
        f"| decode + preprocess one photo (p50) | {raw['decode_ms']:.2f} ms |",
        f"| CPU per image: model at batch 1 / at batch {int(raw['batch'])} / decode + preprocess | "
        f"{raw['model_bs1_cpu_ms']:.2f} ms / {raw['model_cpu_ms']:.2f} ms / {raw['decode_cpu_ms']:.2f} ms |",
        "",
        "| scenario | users | requests | errors | req/s | img/s | p50 ms | p95 ms | p99 ms "
        "| mean engine batch | server CPU ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']} | {r['users']} | {r['requests']} | {r['failures']} | {r['rps']:.1f} "
            f"| {r['img_s']:.1f} "
            f"| {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.1f} "
            f"| {r['cpu_ms_per_image']:.2f} |"
        )
    lines += [
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        "| served img/s >= 80 % of raw batch throughput: single photos, default settings (mean of "
        f"{on['n']} runs) | {on['img_s']:.1f} / {raw['batch_img_s']:.1f} = "
        f"{on['img_s'] / raw['batch_img_s']:.0%} | {verdict(on['img_s'] >= 0.8 * raw['batch_img_s'])} |",
        f"| same, {batch_endpoint['name']} | {batch_endpoint['img_s']:.1f} / {raw['batch_img_s']:.1f} = "
        f"{batch_endpoint['img_s'] / raw['batch_img_s']:.0%} "
        f"| {verdict(batch_endpoint['img_s'] >= 0.8 * raw['batch_img_s'])} |",
        f"| ceiling on these {os.cpu_count()} cores (decode + model CPU only, HTTP and locust free) "
        f"| {ceiling:.1f} / {raw['batch_img_s']:.1f} = {ceiling / raw['batch_img_s']:.0%} | - |",
        f"| 0 errors | {errors} | {verdict(errors == 0)} |",
        f"| single-request p50 <= 2 x (model + decode) | {latency['p50']:.0f} ms vs {budget:.1f} ms | "
        f"{verdict(latency['p50'] <= budget)} |",
        f"| what micro-batching buys ({lt.users} users, mean of {on['n']} interleaved on/off pairs) "
        f"| {on['img_s']:.1f} vs {off['img_s']:.1f} img/s (x{on['img_s'] / max(off['img_s'], 1e-9):.2f}); "
        f"p50 {on['p50']:.0f} vs {off['p50']:.0f} ms; server CPU {on['cpu_ms_per_image']:.2f} vs "
        f"{off['cpu_ms_per_image']:.2f} ms/img | - |",
        "",
        "Where the time goes: with micro-batching the server spends "
        f"{on['cpu_ms_per_image']:.2f} ms of CPU per single-photo request, of which the model "
        f"({model_ms:.2f} ms at its cheaper batch size) and decode + preprocess "
        f"({raw['decode_cpu_ms']:.2f} ms, both timed alone) are {engine_share:.0%}; the rest is HTTP, "
        "multipart parsing, thread hand-offs, the JSON answer and running on a busy machine, mostly paid "
        f"per request whatever the batch size (the batch endpoint pays it once per {int(lt.batch_files)} "
        "photos). The model costs "
        f"{raw['model_bs1_cpu_ms']:.2f} ms of CPU per image at batch 1 and {raw['model_cpu_ms']:.2f} ms at batch "
        f"{int(raw['batch'])} ({settings.num_threads or 'all'} ONNX Runtime thread(s) per call). "
        "Micro-batching saves per-call overhead (one thread hand-off and one ONNX Runtime call serve many "
        "requests) and pays the model's cost per image at the larger batch: "
        f"{on['cpu_ms_per_image']:.2f} ms of server CPU per image with it on vs {off['cpu_ms_per_image']:.2f} "
        "off. Served and "
        "raw numbers move with the load of the shared machine from one scenario to the next: compare runs of "
        "one report.",
        "",
        "Locust reports latencies rounded to 2 significant digits (ms). Rerun: "
        f"`python scripts/load_test.py package=<dir> serve.load_test.duration_s={lt.duration_s} "
        f"serve.load_test.users={lt.users}`.",
        "",
    ]
    return "\n".join(lines)


def _mean(runs: list[dict]) -> dict[str, float]:
    keys = ("img_s", "p50", "cpu_ms_per_image")
    return {"n": len(runs), **{k: float(np.mean([r[k] for r in runs])) for k in keys}}


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
    logger.info("Raw engine: {:.1f} img/s at batch {:.0f}; batch-1 {:.2f} ms; decode {:.2f} ms",
                raw["batch_img_s"], raw["best_batch"],
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
    ]  # fmt: skip
    # On and off alternate so that a change in the machine's load hits both alike.
    for rep in range(1, int(lt.repeats) + 1):
        runs += [
            scenario(f"single photos, micro-batching on (#{rep})", settings=settings, kind="on",
                     user_class="SingleImageUser", users=int(lt.users), images_per_request=1, **common),
            scenario(f"single photos, micro-batching off (#{rep})", settings=off, kind="off",
                     user_class="SingleImageUser", users=int(lt.users), images_per_request=1, **common),
        ]  # fmt: skip
    runs += [
        scenario(f"single photos, micro-batching on, wait {waiting.max_wait_ms:g} ms", settings=waiting,
                 user_class="SingleImageUser", users=int(lt.users), images_per_request=1, **common),
        scenario(f"batch endpoint, {int(lt.batch_files)} photos/request", settings=settings,
                 user_class="BatchUser",
                 users=int(lt.batch_users), images_per_request=int(lt.batch_files), **common),
    ]  # fmt: skip
    # The engine again after the load: the reference should see the same machine load as the scenarios.
    raw_end = raw_engine(package, photos, settings, float(lt.engine_seconds))
    raw["batch_img_s_runs"] = (raw["batch_img_s"], raw_end["batch_img_s"])
    raw["batch_img_s"] = (raw["batch_img_s"] + raw_end["batch_img_s"]) / 2
    section = render(package, raw, runs, settings, lt, int(cfg.serve.workers))
    write_section(Path(str(lt.report)), section)
    print(section)


if __name__ == "__main__":
    main(sys.argv[1:])
