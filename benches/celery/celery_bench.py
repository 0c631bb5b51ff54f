"""The anchor of benches/cluster.rs: no-op Celery tasks through RabbitMQ, as Hopen ran them.

Celery 5 with the RabbitMQ broker (durable queue, persistent messages, acks late off: the
defaults), its SQLAlchemy result backend on PostgreSQL (every task's result row, as Hopen
kept task results in PostgreSQL), `task_track_started` (a STARTED row too, as an operator's
view of running tasks needs) and K worker processes of `--concurrency SLOTS` (prefork, the
default pool). The task returns the instant it started.

  python celery_bench.py --broker URL --backend URL --queue Q --workers K --slots S \
      --burst M --paced N --rate R

Prints one JSON object: the burst's runs/s (M tasks sent as fast as one producer can, from
the first send to the last start) and the paced round's enqueue→start p50/p99 (N tasks at R
per second), in seconds. Exit 1 with a message when something fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from celery import Celery

APP_SOURCE = """
import os, time
from celery import Celery
app = Celery("bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.task_track_started = True
app.conf.task_default_queue = os.environ["BENCH_QUEUE"]
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_connection_retry_on_startup = True

@app.task(name="noop")
def noop(enqueued_at):
    return time.time()
"""


def percentile(values, q):
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[k]


def tree(pid):
    """The process and all its descendants (a prefork worker's pool children)."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for k in kids:
        out.extend(tree(k))
    return out


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def pss_mb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--burst", type=int, default=2000)
    p.add_argument("--paced", type=int, default=300)
    p.add_argument("--rate", type=float, default=20.0)
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="celery-bench-")
    with open(os.path.join(work, "benchapp.py"), "w") as f:
        f.write(APP_SOURCE)
    env = dict(os.environ, BENCH_BROKER=a.broker, BENCH_BACKEND=a.backend, BENCH_QUEUE=a.queue,
               PYTHONPATH=work)
    os.environ.update(env)
    sys.path.insert(0, work)
    import benchapp  # noqa: E402  (the same app the workers run)

    app = benchapp.app
    procs = []
    try:
        for k in range(a.workers):
            log = open(os.path.join(work, f"worker{k}.log"), "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "benchapp", "worker",
                 "--concurrency", str(a.slots), "--pool", "prefork", "-Q", a.queue,
                 "-n", f"w{k}@%h", "--loglevel", "WARNING", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 120
        while True:
            replies = app.control.ping(timeout=1.0) or []
            if len(replies) >= a.workers:
                break
            if time.time() > deadline:
                raise SystemExit(f"only {len(replies)} of {a.workers} Celery workers answered")
            for pr in procs:
                if pr.poll() is not None:
                    raise SystemExit(f"a Celery worker exited ({pr.returncode}); logs in {work}")
        # Warm up: the result tables exist, every child has imported the app.
        [r.get(timeout=60) for r in [benchapp.noop.delay(time.time()) for _ in range(a.workers * a.slots * 2)]]

        sent = []
        results = []
        for _ in range(a.burst):
            t = time.time()
            results.append(benchapp.noop.delay(t))
            sent.append(t)
        starts = [r.get(timeout=600) for r in results]
        burst_span = max(starts) - min(sent)
        burst = {
            "runs": a.burst,
            "runs_per_s": a.burst / burst_span,
            "lag_p50": percentile([s - e for s, e in zip(starts, sent)], 0.5),
            "lag_p99": percentile([s - e for s, e in zip(starts, sent)], 0.99),
        }

        lags = []
        pending = []
        t0 = time.time()
        for k in range(a.paced):
            due = t0 + k / a.rate
            now = time.time()
            if due > now:
                time.sleep(due - now)
            t = time.time()
            pending.append((t, benchapp.noop.delay(t)))
        for t, r in pending:
            lags.append(r.get(timeout=600) - t)
        # A worker at rest: its process tree's CPU over 10 s and proportional memory.
        pids = [p for pr in procs for p in tree(pr.pid)]
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(10)
        idle_cpu = (sum(cpu_seconds(p) for p in pids) - before) / 10.0 / len(procs)
        idle_pss = sum(pss_mb(p) for p in pids) / len(procs)
        print(json.dumps({
            "idle": {"pss_mb": idle_pss, "cpu_core_share": idle_cpu},
            "burst": burst,
            "paced": {"runs": a.paced, "rate": a.rate, "lag_p50": percentile(lags, 0.5),
                      "lag_p99": percentile(lags, 0.99)},
        }))
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()


if __name__ == "__main__":
    main()
