"""Benchmark the HTTP server: throughput and latency under concurrent clients, memory over a long run.

  uv run python bench/bench_server.py [--per-client 2] [--c1-requests 8] [--n-cand 4] [--long 200] [--out
  bench/results/bench_server.json]

Needs trained artifacts (the main job). Starts the real server (`09_server.py`, loopback only, a
free port) and, in one run, side by side:
- batched (the default: concurrent requests' sentence steps share decoder batches): 1, 4, 8 and
  16 concurrent clients, each sending `--per-client` requests one after another (one client sends
  `--c1-requests`, so the ratios' denominator is not two samples); throughput
  (requests/s) and p50/p95 latency, each as a ratio to 1 client; then `--long` requests at 8
  clients (one sentence each) while the server's resident memory is sampled: peak RSS, and the
  growth from the end of the first tenth of the run to its end (`rss_growth_mb`);
- the baseline: the same server with MAX_BATCH_ROWS=1 (one request per decoder batch, as before
  batching) at 1 and 8 clients;
- the same server with DTYPE=bf16 (`--bf16 1`, the default; skipped where the default already is
  bf16, on CUDA) at 1 and 8 clients;
- on a CPU, the same server with PACK_WEIGHTS=0 (`--unpacked 1`, the default: the decoder's matrices
  not reordered for oneDNN) at 1 and 8 clients.
1 and 8 clients run twice each, interleaved, and each pair is pooled (requests over summed wall
time), since this machine's speed drifts within minutes. Errors are non-200 answers or failed connections.
Writes a JSON with a flat `summary`:
throughput_ratio_8, throughput_ratio_16 (requests/s), sentences_ratio_8, errors, rss_growth_mb (and
the baseline's ratio, and bf16_throughput_ratio_8, bf16_sentences_ratio_8, bf16_over_fp32_c8,
unpacked_throughput_ratio_8, packed_over_unpacked_c1, packed_over_unpacked_c8).
Reads RSS from /proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
PROMPTS = [
    "Paris is the capital of France.",
    "The Amazon is the largest rainforest on Earth.",
    "Ludwig van Beethoven was a German composer and pianist.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, extra_env: dict[str, str]):
        self.port = free_port()
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "MAX_QUEUE": "64",
            **extra_env,
            "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        }
        self.log = open(f"/tmp/next_speed_bench_server_{self.port}.log", "w")  # noqa: SIM115 - the server's log
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "09_server.py")], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise SystemExit("the server never became healthy")

    def post(self, payload: dict) -> tuple[int, float, dict]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/generate",
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=1200) as r:
                body = json.loads(r.read())
                return r.status, time.perf_counter() - t0, body
        except urllib.error.HTTPError as e:
            return e.code, time.perf_counter() - t0, {}
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, time.perf_counter() - t0, {}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load(server: Server, clients: int, per_client: int, params: dict, max_sentences: int, on_done=None) -> dict:
    lat: list[float] = []
    sents = [0]
    errors = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(per_client):
            k = c * per_client + i
            status, dt, body = server.post(
                {"prompt": PROMPTS[k % len(PROMPTS)], "max_sentences": max_sentences, "params": {**params, "seed": k}}
            )
            with lock:
                lat.append(dt)
                if status != 200:
                    errors[0] += 1
                else:
                    sents[0] += len(body.get("sentences", []))
                if on_done:
                    on_done(len(lat))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else lat * 19
    row = {
        "clients": clients,
        "requests": len(lat),
        "errors": errors[0],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 4),
        "sentences_per_s": round(sents[0] / wall, 3),
        "p50_s": round(statistics.median(lat), 2),
        "p95_s": round(q[18], 2),
    }
    print(json.dumps(row), flush=True)
    return row


def pooled(runs: list[dict]) -> dict:
    """Runs of the same load as one row: requests and sentences over the summed wall time (this
    machine's speed drifts by a tenth within minutes; the ratios' two ends are each measured twice,
    interleaved), p50/p95 the runs' mean; the runs kept under `runs`."""
    if len(runs) == 1:
        return runs[0]
    wall = sum(r["wall_s"] for r in runs)
    req = sum(r["requests"] for r in runs)
    sents = sum(r["sentences_per_s"] * r["wall_s"] for r in runs)
    return {
        "clients": runs[0]["clients"],
        "requests": req,
        "errors": sum(r["errors"] for r in runs),
        "wall_s": round(wall, 2),
        "requests_per_s": round(req / wall, 4),
        "sentences_per_s": round(sents / wall, 3),
        "p50_s": round(statistics.mean(r["p50_s"] for r in runs), 2),
        "p95_s": round(statistics.mean(r["p95_s"] for r in runs), 2),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument(
        "--c1-requests", type=int, default=8, help="requests of the 1-client runs (the ratios' denominator)"
    )
    ap.add_argument("--n-cand", type=int, default=4)
    ap.add_argument("--sentences", type=int, default=2)
    ap.add_argument("--long", type=int, default=200, help="requests of the memory run (8 clients)")
    ap.add_argument("--bf16", type=int, default=1, help="also run 1 and 8 clients with DTYPE=bf16 (0: skip)")
    ap.add_argument(
        "--unpacked", type=int, default=1, help="also run 1 and 8 clients with PACK_WEIGHTS=0 on a CPU (0: skip)"
    )
    ap.add_argument("--out", default="bench/results/bench_server.json")
    args = ap.parse_args()
    from next_speed.core.artifacts import write_json

    params = {"n_cand": args.n_cand}
    res: dict = {
        "per_client": args.per_client,
        "c1_requests": args.c1_requests,
        "n_cand": args.n_cand,
        "max_sentences": args.sentences,
        "batched": {},
        "baseline": {},
    }
    srv = Server({"DTYPE": "auto", "PACK_WEIGHTS": "1"})  # the default, whatever the caller's environment says
    try:
        load(srv, 1, 1, params, 1)  # warm-up
        runs: dict[int, list[dict]] = {}
        for c in (1, 4, 8, 16, 1, 8):  # 1 and 8 clients twice, interleaved: the ratio the issue names
            runs.setdefault(c, []).append(
                load(srv, c, args.c1_requests if c == 1 else args.per_client, params, args.sentences)
            )
        res["batched"] = {f"c{c}": pooled(r) for c, r in sorted(runs.items())}
        # memory: --long short requests at 8 clients, RSS sampled every half second
        samples: list[tuple[int, float]] = []
        done = [0]
        stop = threading.Event()

        def monitor() -> None:
            while not stop.is_set():
                samples.append((done[0], rss_mb(srv.proc.pid)))
                stop.wait(0.5)

        mon = threading.Thread(target=monitor)
        mon.start()
        per = max(1, args.long // 8)
        long_row = load(srv, 8, per, {"n_cand": 1, "max_new_tokens": 24}, 1, on_done=lambda n: done.__setitem__(0, n))
        stop.set()
        mon.join()
        warm = next((mb for n, mb in samples if n >= per * 8 // 10), samples[0][1])
        end = rss_mb(srv.proc.pid)
        res["memory"] = {
            **long_row,
            "rss_after_first_tenth_mb": round(warm, 1),
            "rss_end_mb": round(end, 1),
            "peak_rss_mb": round(rss_mb(srv.proc.pid, "VmHWM"), 1),
            "rss_growth_mb": round(end - warm, 1),
        }
        print(json.dumps(res["memory"]), flush=True)
    finally:
        srv.close()

    def one_and_eight(env: dict[str, str]) -> dict:
        """A fresh server with `env`: a warm-up request, then 1 and 8 clients."""
        srv = Server(env)
        try:
            load(srv, 1, 1, params, 1)
            runs: dict[int, list[dict]] = {}
            for c in (1, 8, 1, 8):
                runs.setdefault(c, []).append(
                    load(srv, c, args.c1_requests if c == 1 else args.per_client, params, args.sentences)
                )
            return {f"c{c}": pooled(r) for c, r in runs.items()}
        finally:
            srv.close()

    res["baseline"] = one_and_eight({"MAX_BATCH_ROWS": "1", "DTYPE": "auto", "PACK_WEIGHTS": "1"})
    from next_speed.core.runtime import pick_device, resolve_dtype

    device = pick_device(os.environ.get("DEVICE", "auto"))
    if args.unpacked and device == "cpu" and resolve_dtype("auto", device) == "fp32":
        # the same server without the oneDNN-packed matrices (PACK_WEIGHTS's baseline)
        res["unpacked"] = one_and_eight({"DTYPE": "auto", "PACK_WEIGHTS": "0"})
    if args.bf16 and resolve_dtype("auto", device) != "bf16":
        # the same server with the decoder in bf16 (on CUDA the default already is)
        res["bf16"] = one_and_eight({"DTYPE": "bf16", "PACK_WEIGHTS": "1"})
    B, R = res["batched"], res["baseline"]
    one = B["c1"]["requests_per_s"]
    res["summary"] = {
        "throughput_ratio_4": round(B["c4"]["requests_per_s"] / one, 2),
        "throughput_ratio_8": round(B["c8"]["requests_per_s"] / one, 2),
        "throughput_ratio_16": round(B["c16"]["requests_per_s"] / one, 2),
        # the same in sentences/s: a request can end early (the stop rules), so requests differ in work
        "sentences_ratio_8": round(B["c8"]["sentences_per_s"] / B["c1"]["sentences_per_s"], 2),
        "p50_ratio_8": round(B["c8"]["p50_s"] / B["c1"]["p50_s"], 2),
        "p95_ratio_8": round(B["c8"]["p95_s"] / B["c1"]["p95_s"], 2),
        "p50_ratio_16": round(B["c16"]["p50_s"] / B["c1"]["p50_s"], 2),
        "p95_ratio_16": round(B["c16"]["p95_s"] / B["c1"]["p95_s"], 2),
        "baseline_throughput_ratio_8": round(R["c8"]["requests_per_s"] / R["c1"]["requests_per_s"], 2),
        "errors": sum(
            r["errors"]
            for r in (
                *B.values(),
                *R.values(),
                *res.get("bf16", {}).values(),
                *res.get("unpacked", {}).values(),
                res["memory"],
            )
        ),
        "rss_growth_mb": res["memory"]["rss_growth_mb"],
        "peak_rss_mb": res["memory"]["peak_rss_mb"],
    }
    if "bf16" in res:
        F = res["bf16"]
        res["summary"].update(
            bf16_throughput_ratio_8=round(F["c8"]["requests_per_s"] / F["c1"]["requests_per_s"], 2),
            bf16_sentences_ratio_8=round(F["c8"]["sentences_per_s"] / F["c1"]["sentences_per_s"], 2),
            bf16_over_fp32_c8=round(F["c8"]["requests_per_s"] / B["c8"]["requests_per_s"], 2),
        )
    if "unpacked" in res:
        U = res["unpacked"]
        res["summary"].update(
            unpacked_throughput_ratio_8=round(U["c8"]["requests_per_s"] / U["c1"]["requests_per_s"], 2),
            packed_over_unpacked_c1=round(B["c1"]["requests_per_s"] / U["c1"]["requests_per_s"], 2),
            packed_over_unpacked_c8=round(B["c8"]["requests_per_s"] / U["c8"]["requests_per_s"], 2),
        )
    print(json.dumps(res["summary"], indent=2))
    write_json(args.out, res)


if __name__ == "__main__":
    main()
