"""``resclip-bench --serve``: the service against in-process ``segment()`` on the same image in
the same run — requests/s and p50/p99 latency at 1, 2 and 4 concurrent clients, the server's
resident memory across every request, and every answer checked against in-process labels.

The service runs as ``resclip-serve`` would run it: its own process (uvicorn), on a free
loopback port, stopped by its process group id. Clients are threads here with one keep-alive
connection each (the standard library's http.client: nothing to install).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from .errors import UserError, cpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; raises OSError when nothing answers."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(url: str, timeout_s: float, alive: Any = lambda: True) -> None:
    """Until ``url``/readyz answers 200; ``alive()`` False (the server died) stops early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise UserError(f"the service at {url} exited while starting")
        try:
            if get(url + "/readyz", 2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise UserError(f"the service at {url} was not ready within {timeout_s:g} s")


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of session ``sid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, _, _, session = stat[stat.rindex(")") + 2:].split()[:4]
        if state != "Z" and int(session) == sid:
            found.append((int(entry), cmd))
    return found


class ServiceProcess:
    """``python -m resclip_deploy.serve BUNDLE --port P ARGS...`` in its own process group on a
    free loopback port; ready when constructed, stopped by its id."""

    def __init__(self, bundle: str, *args: str, env: Optional[dict[str, str]] = None,
                 ready_timeout_s: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resclip_deploy.serve", str(bundle), "--port",
             str(self.port), "-q", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})})
        try:
            wait_ready(self.url, ready_timeout_s, lambda: self.proc.poll() is None)
        except UserError as e:
            self.stop()
            output = self.proc.stdout.read().decode(errors="replace").strip()
            raise UserError(f"{e}: {output.splitlines()[-1] if output else 'no output'}") \
                from None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the service alone (under --ray it shuts its Ray down, which a signal to
        every process would break), then SIGKILL to whatever is left of its session: Ray's
        workers run in process groups of their own, but in the service's session."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        for pid, _ in session_processes(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def rss_mb(self) -> float:
        """Resident MB of the service: its session's processes summed (under Ray, the replicas
        and Ray's own processes too)."""
        return session_rss_mb(self.proc.pid)

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


class Client:
    """One keep-alive connection posting images to /v1/segment."""

    def __init__(self, url: str, token: Optional[str] = None, timeout_s: float = 300.0):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self.headers = {"Content-Type": "application/octet-stream"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def segment(self, body: bytes, query: str = "") -> tuple[int, bytes]:
        self.conn.request("POST", "/v1/segment" + query, body=body, headers=self.headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self) -> None:
        self.conn.close()


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def load_level(url: str, body: bytes, expected_png: bytes, clients: int, requests: int,
               token: Optional[str] = None, rss: Any = None) -> dict[str, Any]:
    """``requests`` POSTs of ``body`` from ``clients`` threads at once; each answer's label PNG
    is compared with ``expected_png`` (byte-equal: the same labels, the same encoder).
    ``rss()`` (the server's resident MB) is sampled every 10 requests."""
    lock = threading.Lock()
    latencies: list[float] = []
    failures: dict[str, int] = {}
    memory: list[float] = []
    issued = [0]

    def worker() -> None:
        client = Client(url, token)
        try:
            while True:
                with lock:
                    if issued[0] >= requests:
                        return
                    issued[0] += 1
                    if rss is not None and issued[0] % 10 == 1:
                        memory.append(rss())
                start = time.perf_counter()
                try:
                    status, content = client.segment(body)
                except OSError as e:
                    status, content = 0, type(e).__name__.encode()
                    client.close()
                    client = Client(url, token)
                took = time.perf_counter() - start
                with lock:
                    if status == 200 and content == expected_png:
                        latencies.append(took)
                    else:
                        key = str(status) if status != 200 else "wrong labels"
                        failures[key] = failures.get(key, 0) + 1
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "ok": len(latencies),
            "failures": failures, "requests_per_s": len(latencies) / wall,
            "p50_s": percentile(latencies, 50) if latencies else None,
            "p99_s": percentile(latencies, 99) if latencies else None,
            "rss_mb": [round(m) for m in memory]}


def one_client_overhead(url: str, body: bytes, expected_png: bytes, in_process: Any,
                        pairs: int, token: Optional[str] = None) -> dict[str, Any]:
    """In-process ``segment()`` and one request on the same image, alternated ``pairs`` times
    (the machine's drift hits both alike): medians and the service's overhead over them."""
    client = Client(url, token)
    local, remote, wrong = [], [], 0
    try:
        for _ in range(pairs):
            start = time.perf_counter()
            in_process()
            local.append(time.perf_counter() - start)
            start = time.perf_counter()
            status, content = client.segment(body)
            remote.append(time.perf_counter() - start)
            wrong += status != 200 or content != expected_png
    finally:
        client.close()
    ours, theirs = statistics.median(local), statistics.median(remote)
    return {"pairs": pairs, "in_process_s": ours, "service_s": theirs,
            "overhead": theirs / ours - 1, "failed": wrong}


def serve_benchmark(bundle_dir: str, segmenter: Any, rgb: np.ndarray, device: str,
                    threads: Optional[int], levels: Sequence[int], requests: int,
                    pairs: int, ray_replicas: int = 0) -> list[dict[str, Any]]:
    """The service on this bundle against ``segmenter`` in this process, same image (sent as
    PNG, so both sides decode identical pixels): uvicorn in one process, then (``ray_replicas``
    > 0) Ray Serve on a local Ray with that many replicas sharing this machine's CPUs."""
    import cv2

    from .io import decode_image, label_png_bytes
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, "PNG encoding of the bench image cannot fail"
    body = buf.tobytes()
    decoded = decode_image(body, "the bench image")
    labels = segmenter.segment(decoded, with_probs=False)
    expected = label_png_bytes(labels.labels, len(labels.class_names))
    common = ["--device", device, "--max-in-flight", str(max(levels))]
    services = [("uvicorn, one process", segmenter,
                 common + (["--threads", str(threads)] if threads else []))]
    if ray_replicas:
        from .runtime.segmenter import Segmenter
        each = max(1, threads // ray_replicas) if threads else cpus(ray_replicas)
        # one replica's answer against the segmenter with one replica's threads
        services.append((f"Ray Serve, {ray_replicas} replicas of {each} CPU(s)",
                         Segmenter.from_bundle(bundle_dir, device=device, threads=each),
                         common + ["--ray", "--replicas", str(ray_replicas),
                                   "--cpus-per-replica", str(each)]))
    reports = []
    for name, local, args in services:
        with ServiceProcess(bundle_dir, *args, env={"RAY_USAGE_STATS_ENABLED": "0"},
                            ready_timeout_s=600) as server:
            rss = server.rss_mb
            rss_start = rss()
            overhead = one_client_overhead(server.url, body, expected,
                                           functools.partial(local.segment, decoded, False),
                                           pairs)
            rows = [load_level(server.url, body, expected, c, requests, rss=rss)
                    for c in levels]
            reports.append({"service": name, "overhead_one_client": overhead, "levels": rows,
                            "requests_total": pairs + len(levels) * requests,
                            "rss_mb_after_warmup": round(rss_start), "rss_mb_end": round(rss())})
    return reports


def session_rss_mb(sid: int) -> float:
    """Resident MB of every process of session ``sid`` (the service and, under Ray, its
    workers) summed."""
    total = 0
    for pid, _ in session_processes(sid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS")), 0)
    return total / 1024


def format_serve(services: list[dict[str, Any]]) -> list[str]:
    lines = []
    for s in services:
        o = s["overhead_one_client"]
        lines.append(f"{s['service']} vs in-process segment(), same image, alternated "
                     f"{o['pairs']} times: {o['service_s']:.3f} s vs {o['in_process_s']:.3f} s "
                     f"per image, overhead {100 * o['overhead']:+.1f} %"
                     + (f", {o['failed']} FAILED" if o["failed"] else ""))
        for row in s["levels"]:
            bad = ", ".join(f"{n}x {k}" for k, n in row["failures"].items()) or "none failed"
            p50 = f"{row['p50_s']:.3f}" if row["p50_s"] is not None else "-"
            p99 = f"{row['p99_s']:.3f}" if row["p99_s"] is not None else "-"
            lines.append(f"  {row['clients']} client(s), {row['requests']} requests: "
                         f"{row['requests_per_s']:.2f} req/s, p50 {p50} s, p99 {p99} s; {bad}")
        rss = [m for row in s["levels"] for m in row["rss_mb"]]
        lines.append(f"  service RSS over {s['requests_total']} requests (MB, every 10): after "
                     f"warm-up {s['rss_mb_after_warmup']}, min {min(rss, default=0)}, max "
                     f"{max(rss, default=0)}, end {s['rss_mb_end']}")
    return lines
