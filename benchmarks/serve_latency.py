"""Latency and throughput of `rectrain serve`'s POST /recommend, with and without request batching.

    python benchmarks/serve_latency.py [--items 100000] [--requests 2000] [--clients 8] [--k 10]
                                       [--exact-limit 200000] [--work DIR]

Trains the debug recipe (configs/debug.yaml, a random 64-wide Llama) for 2 steps on a synthetic
log whose catalog has `--items` items, exports it (every item embedded, a faiss index), then
starts the service twice on 127.0.0.1, batching on and off, and sends `--requests` requests from
`--clients` concurrent clients (each a history of 1-10 random catalog ids). Printed: p50 / p99
latency as the clients saw it, requests/s over the whole burst, and the command. The model's
quality plays no part in these figures; the catalog size and the encoder's shape do.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rectrain(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rectrain {args[0]} failed:\n{done.stderr[-3000:]}")


def post(url: str, body: dict) -> float:
    """Seconds from sending to the whole answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    begin = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - begin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(export: Path, batching: bool, bodies: list[dict], clients: int) -> dict[str, float]:
    port = free_port()
    command = [sys.executable, "-m", "train.cli", "serve", str(export), "--port", str(port)]
    server = subprocess.Popen(command + ([] if batching else ["--no-batching"]), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"the service failed: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
                time.sleep(0.5)
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda body: post(url + "/recommend", body), bodies[:clients * 5]))  # warm-up
            begin = time.perf_counter()
            latencies = np.array(list(pool.map(lambda body: post(url + "/recommend", body), bodies)))
            elapsed = time.perf_counter() - begin
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"p50_ms": float(np.percentile(latencies, 50) * 1000), "p99_ms": float(np.percentile(latencies, 99) * 1000),
            "requests_s": len(bodies) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000, help="catalog size (default 100000)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exact-limit", type=int, default=200_000, help="rectrain export --exact-limit")
    parser.add_argument("--work", type=Path, help="folder for the run and export (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="serve_latency-"))
    run = work / "run"
    started = time.perf_counter()
    rectrain("train", "configs/debug.yaml", f"output_dir={run}", f"data.dir={work / 'data'}", "train.max_steps=2",
             "train.save_every=2", f"data.synthetic.num_items={args.items}", "data.synthetic.num_users=2000",
             "eval.batch_size=512", "resume=never")
    rectrain("export", str(run), "--out", str(work / "export"), "--exact-limit", str(args.exact_limit), "--overwrite")
    setup_s = time.perf_counter() - started
    manifest = json.loads((work / "export" / "rectrain.json").read_text())
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(args.items)]  # the synthetic catalog's ids
    bodies = [{"history": [ids[j] for j in rng.choice(args.items, size=int(rng.integers(1, 11)), replace=False)],
               "k": args.k} for _ in range(args.requests)]
    rows = {mode: measure(work / "export", mode == "batched", bodies, args.clients) for mode in ("batched", "one by one")}
    print(f"\ncommand: (cd {ROOT.name} && python benchmarks/serve_latency.py --items {args.items} "
          f"--requests {args.requests} --clients {args.clients} --k {args.k} --exact-limit {args.exact_limit})")
    print(f"catalog {manifest['items']} items x {manifest['dim']}, {manifest['index']} index; train + export "
          f"{setup_s:.0f} s; {args.clients} clients, {args.requests} requests, k={args.k}")
    print(f"{'mode':<12}{'p50 ms':>9}{'p99 ms':>9}{'requests/s':>12}")
    for mode, row in rows.items():
        print(f"{mode:<12}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['requests_s']:>12.0f}")


if __name__ == "__main__":
    main()
