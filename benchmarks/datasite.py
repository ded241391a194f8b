"""Datasite: sandbox start-up per job, status polling under 50 clients, a federated request.

* sandbox: the same function (the mean of a column of a ``--rows`` table, returned as a
  wire payload) run three ways, interleaved, ``--repeats`` times each: in-process (decode
  the table, call, encode the result: the floor), in the sandbox without bubblewrap
  (``python -I``, rlimits, process group, audit hooks, uid drop) and in the full sandbox
  (plus bwrap's namespaces). Medians; the added milliseconds per job against the floor
  and the ratio (target: at most 150 ms added).
* polling: 50 concurrent clients (``--procs`` processes of threads, one keep-alive TLS
  connection each) asking ``GET /api/requests/{id}/status`` for ``--seconds``; requests per
  second, against a floor: the same uvicorn + FastAPI + TLS answering a constant JSON with
  no authentication and no database. Both servers run one worker process.
* federated: one request at ``--sites`` datasites on 127.0.0.1 (submit to each, every owner
  approves, the sites as shoal nodes hold their results and join shoal's SecureSum over
  HTTPS), wall seconds from submission to the sum, against the sum over the sites of one
  single-site review request each (submit, approve, release, fetch); and the secure-sum
  step alone (from every site having run the code to the sum).

    python benchmarks/datasite.py --repeats 20 --json datasite.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import shoal
from shoal.datasite import submit_federated
from shoal.datasite.client import Datasite, connect
from shoal.datasite.sandbox import SandboxLimits, bwrap_available, run_sandboxed
from shoal.datasite.state import DatasiteState
from shoal.datasite.table import Table, decode_table, encode_table
from shoal.wire import encode

SRC = str(Path(shoal.__file__).resolve().parent.parent)
SOURCE = "def job(assets):\n    return {'mean': float(assets['t']['x'].mean())}\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- sandbox ---------------------------------------------------------------------------------


# The sandboxed job also reports the CPU its process used so far (interpreter start, imports,
# decoding, the call): on a shared machine CPU time says more than wall time.
CPU_SOURCE = SOURCE.replace(
    "    return",
    "    import resource, sys\n"
    "    r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "    print(f'cpu={r.ru_utime + r.ru_stime}', file=sys.stderr)\n"
    "    return",
)


def bench_sandbox(rows: int, repeats: int) -> dict[str, Any]:
    import resource

    rng = np.random.default_rng(0)
    blob = encode_table(Table(name="t", columns={"x": rng.normal(size=rows)}))
    namespace: dict[str, Any] = {}
    exec(compile(SOURCE, "<bench>", "exec"), namespace)  # our own benchmark code
    fn = namespace["job"]

    def in_process() -> float:
        c0 = time.process_time()
        tables = {"t": decode_table(blob)}
        bytes(encode(fn(tables)))
        return time.process_time() - c0

    limits = SandboxLimits(wall_seconds=60)

    def sandboxed(isolate: bool) -> float:
        c0 = time.process_time()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = run_sandboxed(
            source=CPU_SOURCE,
            entrypoint="job",
            inputs={"t": blob},
            params={},
            limits=limits,
            isolate=isolate,
        )
        assert out.state == "succeeded", out.reason
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        job = float(out.logs.split("cpu=")[1].split()[0])
        children = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        # the server's own work, bwrap's, and the job's (under bwrap, the job runs in a PID
        # namespace whose CPU never reaches our RUSAGE_CHILDREN; without it, it does)
        return time.process_time() - c0 + (children if not isolate else children + job)

    ways: dict[str, Any] = {
        "in-process": in_process,
        "sandbox (no bwrap)": lambda: sandboxed(False),
    }
    if bwrap_available():
        ways["sandbox (bwrap)"] = lambda: sandboxed(True)
    times: dict[str, list[float]] = {k: [] for k in ways}
    cpus: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(2):  # warm-up: page cache, first imports
        for run in ways.values():
            run()
    for _ in range(repeats):
        for name, run in ways.items():
            t0 = time.perf_counter()
            cpu = run()
            times[name].append(time.perf_counter() - t0)
            cpus[name].append(cpu)
    floor = statistics.median(times["in-process"])
    floor_cpu = statistics.median(cpus["in-process"])
    out = {}
    for name, values in times.items():
        median = statistics.median(values)
        cpu = statistics.median(cpus[name])
        out[name] = {
            "median_ms": median * 1e3,
            "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3,
            "added_ms": (median - floor) * 1e3,
            "ratio": median / floor,
            "cpu_ms": cpu * 1e3,
            "added_cpu_ms": (cpu - floor_cpu) * 1e3,
        }
    return {"rows": rows, "repeats": repeats, "results": out}


# -- servers ---------------------------------------------------------------------------------


class Site:
    def __init__(self, base: Path, name: str, rows: int) -> None:
        from shoal.runtime.grpc.certs import make_certs

        self.dir = base / name
        with DatasiteState(self.dir, create=True) as state:
            self.owner = state.add_user("owner", "owner", actor="bench")
            self.scientist = state.add_user("sci", "scientist", actor="bench")
            state.set_name(name)
        self.ca = make_certs(self.dir / "certs").ca
        data = base / f"{name}.csv"
        rng = np.random.default_rng(len(name))
        with open(data, "w") as f:
            f.write("id,age\n")
            for i in range(rows):
                f.write(f"{i},{int(rng.integers(18, 90))}\n")
        for attempt in range(5):  # a free port may be taken before the server binds it
            self.port = free_port()
            self.url = f"https://127.0.0.1:{self.port}"
            with open(self.dir / "server.log", "wb") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "shoal.cli.main",
                        "datasite",
                        "serve",
                        str(self.dir),
                        "--listen",
                        f"127.0.0.1:{self.port}",
                    ],
                    env={**os.environ, "PYTHONPATH": SRC},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_up(
                    lambda: self.as_owner().call("GET", "/api/whoami"),
                    self.proc,
                    self.dir / "server.log",
                )
                break
            except RuntimeError:
                if (
                    attempt == 4
                    or "address already in use" not in (self.dir / "server.log").read_text()
                ):
                    raise
        self.as_owner().call(
            "POST",
            "/api/datasets",
            {
                "name": "patients",
                "path": str(data),
                "bounds": {"age": [0, 120]},
            },
        )

    def as_owner(self) -> Datasite:
        return connect(self.url, self.owner, ca=self.ca)

    def as_scientist(self) -> Datasite:
        return connect(self.url, self.scientist, ca=self.ca)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_up(probe: Any, proc: Any = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            probe()
            return
        except Exception:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text() if log else ''}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


FLOOR_SERVER = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.get("/api/requests/{rid}/status")
async def status(rid: int):
    return {"id": rid, "state": "mock-run", "reason": ""}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            ssl_certfile=sys.argv[2], ssl_keyfile=sys.argv[3])
"""


def _poll_worker(args: tuple[int, int, str, str, str, float, Any]) -> int:
    port, threads, path, token, ca, seconds, start = args
    context = ssl.create_default_context(cafile=ca)
    counts = [0] * threads
    start.wait()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        headers = {"Authorization": f"Bearer {token}"}
        while time.monotonic() < stop_at:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
            counts[i] += 1
        conn.close()

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts)


def poll_rate(
    port: int, path: str, token: str, ca: str, clients: int, procs: int, seconds: float
) -> float:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    with ctx.Pool(procs) as pool:
        result = pool.map_async(
            _poll_worker, [(port, n, path, token, ca, seconds, start) for n in per]
        )
        time.sleep(1.0)  # every worker is waiting on the event
        start.set()
        total = sum(result.get(seconds + 120))
    return total / seconds


def bench_polling(base: Path, clients: int, procs: int, seconds: float, repeats: int) -> dict:
    site = Site(base, "poll", rows=100)
    floor_port = free_port()
    certs = site.dir / "certs"
    floor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FLOOR_SERVER,
            str(floor_port),
            str(certs / "coordinator.pem"),
            str(certs / "coordinator-key.pem"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sci = site.as_scientist()
        request = sci.submit(SOURCE, entrypoint="job", assets=["patients"])
        request.wait(("mock-run",))
        context = ssl.create_default_context(cafile=str(site.ca))

        def floor_up() -> None:
            conn = http.client.HTTPSConnection("127.0.0.1", floor_port, context=context)
            conn.request("GET", "/api/requests/1/status")
            conn.getresponse().read()

        wait_up(floor_up)
        path = f"/api/requests/{request.id}/status"
        rates: dict[str, list[float]] = {"datasite": [], "floor (FastAPI, constant)": []}
        for _ in range(repeats):
            rates["datasite"].append(
                poll_rate(site.port, path, site.scientist, str(site.ca), clients, procs, seconds)
            )
            rates["floor (FastAPI, constant)"].append(
                poll_rate(floor_port, path, "x", str(site.ca), clients, procs, seconds)
            )
        return {
            "clients": clients,
            "client_processes": procs,
            "seconds": seconds,
            "repeats": repeats,
            "results": {
                k: {"median_rps": statistics.median(v), "runs": v} for k, v in rates.items()
            },
        }
    finally:
        floor.terminate()
        floor.wait()
        site.stop()


def fed_job(assets):  # type: ignore[no-untyped-def]
    import numpy as np

    ages = assets["patients"]["age"]
    return {"result": np.array([len(ages), float(ages.sum())])}


FED_SOURCE = (
    "def fed_job(assets):\n    import numpy as np\n    ages = assets['patients']['age']\n"
    "    return {'result': np.array([len(ages), float(ages.sum())])}\n"
)


def bench_federated(base: Path, n_sites: int, rows: int, repeats: int) -> dict:
    sites = [Site(base, f"site-{i}", rows) for i in range(n_sites)]
    try:
        single: list[float] = []
        federated: list[float] = []
        secure_sum: list[float] = []
        for r in range(repeats):
            total = 0.0
            for site in sites:
                t0 = time.perf_counter()
                req = site.as_scientist().submit(
                    FED_SOURCE, entrypoint="fed_job", assets=["patients"], name=f"single-{r}"
                )
                req.wait(("mock-run",))
                owner = site.as_owner()
                owner.approve(req.id, req.code_hash)
                req.wait(("succeeded",))
                owner.release(req.id)
                req.result()
                total += time.perf_counter() - t0
            single.append(total)
            t0 = time.perf_counter()
            fed = submit_federated(
                [s.as_scientist() for s in sites],
                FED_SOURCE,
                entrypoint="fed_job",
                assets=["patients"],
                shape=[2],
                clip=1e7,
                name=f"fed-{r}",
            )
            for site in sites:
                rid = fed.requests[site.dir.name].id
                owner = site.as_owner()
                mine = owner.request(rid)
                mine.wait(("mock-run",))
                owner.approve(rid, fed.code_hash)
            for request in fed.requests.values():
                request.wait(("succeeded",))
            t1 = time.perf_counter()
            fed.result()  # the sites as shoal nodes: hold, then SecAgg+ over HTTPS
            secure_sum.append(time.perf_counter() - t1)
            federated.append(time.perf_counter() - t0)
        return {
            "sites": n_sites,
            "rows_per_site": rows,
            "repeats": repeats,
            "federated_median_s": statistics.median(federated),
            "single_site_sum_median_s": statistics.median(single),
            "secure_sum_median_s": statistics.median(secure_sum),
            "secure_sum_runs": secure_sum,
            "federated_runs": federated,
            "single_site_sum_runs": single,
        }
    finally:
        for site in sites:
            site.stop()


def main() -> None:
    # benchmarks/grpc.py sits beside this file: with this directory first on sys.path,
    # `import grpc` (for the certificates) would find it instead of grpcio
    here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0]).resolve() == here:
        sys.path.pop(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="sandbox repeats")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--procs", type=int, default=5, help="client processes")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--poll-repeats", type=int, default=3)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--fed-repeats", type=int, default=3)
    parser.add_argument("--only", choices=["sandbox", "polling", "federated"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    # the machine is shared: its load is part of what a reader needs to judge the figures
    report: dict[str, Any] = {
        "bwrap": bwrap_available(),
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="shoal-bench-datasite-") as tmp:
        base = Path(tmp)
        if args.only in (None, "sandbox"):
            report["sandbox"] = bench_sandbox(args.rows, args.repeats)
            print(f"\nsandbox start-up per job ({args.rows} rows, median of {args.repeats})")
            print(
                f"{'way':<22} {'wall ms':>9} {'added':>8} {'min ms':>8} {'CPU ms':>8} {'added':>8}"
            )
            for name, r in report["sandbox"]["results"].items():
                print(
                    f"{name:<22} {r['median_ms']:>9.1f} {r['added_ms']:>8.1f} "
                    f"{r['min_ms']:>8.1f} {r['cpu_ms']:>8.1f} {r['added_cpu_ms']:>8.1f}"
                )
        if args.only in (None, "polling"):
            report["polling"] = bench_polling(
                base, args.clients, args.procs, args.seconds, args.poll_repeats
            )
            print(
                f"\nstatus polling, {args.clients} concurrent TLS clients "
                f"(median of {args.poll_repeats} x {args.seconds:g} s)"
            )
            for name, r in report["polling"]["results"].items():
                print(f"{name:<28} {r['median_rps']:>10.0f} req/s")
        if args.only in (None, "federated"):
            report["federated"] = bench_federated(base, args.sites, 1000, args.fed_repeats)
            f = report["federated"]
            print(
                f"\nfederated request across {args.sites} datasites on 127.0.0.1 "
                f"(median of {args.fed_repeats})"
            )
            n = args.sites
            label = f"federated (submit, {n} approvals, SecAgg+ sum)"
            print(f"{label:<48} {f['federated_median_s']:>7.2f} s")
            label = "  of which the secure sum (hold + 4 SecAgg+ phases)"
            print(f"{label:<48} {f['secure_sum_median_s']:>7.2f} s")
            label = f"sum of {n} single-site requests"
            print(f"{label:<48} {f['single_site_sum_median_s']:>7.2f} s")
    report["load_average_end"] = os.getloadavg()
    print(
        f"\nload average: {report['load_average_start'][0]:.1f} at the start, "
        f"{report['load_average_end'][0]:.1f} at the end ({report['cpus']} CPUs)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
