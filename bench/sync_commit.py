#!/usr/bin/python3
"""Benchmark: the commit latency synchronous mode adds (#15).

Starts a Postgres 15 cluster (--wal-segsize MB segments) and `pgkeep daemon` with
`synchronous = true` on file:// storage, then runs, in one invocation and interleaved, a pgbench
script of one-row INSERT transactions with 1 and with 8 clients:
  async:  synchronous_standby_names = ''        (the daemon streams; commits do not wait for it)
  sync:   synchronous_standby_names = 'pgkeep'  (each COMMIT waits until its WAL is in storage)
and prints per-transaction latency p50/p99 (pgbench -l) and TPS, with sync/async ratios, and the
time of one small durable write to the same file system (4 KiB: write, fsync, rename, fsync of
the folder), the floor of one upload there.

Usage: bench/sync_commit.py [--seconds 10] [--wal-segsize 16] [--rounds 2] [--pgkeep target/release/pgkeep]
"""
import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
ROOT = os.getuid() == 0


def as_pg(cmd, env=None):
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return (["runuser", "-u", "postgres", "--"] if ROOT else []) + ["env", *extra, *cmd]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))] if v else float("nan")


def small_put_ms(folder, n=50):
    """Median time of a 4 KiB durable write (temp file, fsync, rename, fsync of the folder)."""
    times = []
    for i in range(n):
        t = time.perf_counter()
        tmp = os.path.join(folder, f".probe{i}.tmp")
        with open(tmp, "wb") as f:
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(folder, f"probe{i}"))
        d = os.open(folder, os.O_RDONLY)
        os.fsync(d)
        os.close(d)
        times.append((time.perf_counter() - t) * 1000)
    for i in range(n):
        os.unlink(os.path.join(folder, f"probe{i}"))
    return pct(times, 50)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--wal-segsize", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-sync")
    args = ap.parse_args()
    if not os.path.exists(args.pgkeep):
        subprocess.run(["cargo", "build", "--release", "--bin", "pgkeep"], check=True)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    os.chmod(work, 0o755)
    if ROOT:
        shutil.chown(work, "postgres", "postgres")
    binary = os.path.join(work, "pgkeep")
    shutil.copy(args.pgkeep, binary)
    data, port, http_port = os.path.join(work, "data"), free_port(), free_port()
    subprocess.run(as_pg([f"{PGBIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync",
                          f"--wal-segsize={args.wal_segsize}"]), check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n"
                "max_wal_size = '2GB'\nsynchronous_commit = on\n")
    subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-l", f"{work}/pg.log", "-w", "start"]), check=True,
                   stdout=subprocess.DEVNULL)
    psql = ["psql", "-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-c"]
    daemon = None
    try:
        subprocess.run(psql + ["create table probe (id bigserial primary key, at timestamptz default now())"],
                       check=True)
        script = os.path.join(work, "insert.sql")
        with open(script, "w") as f:
            f.write("insert into probe default values;\n")
        env = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres",
               "PGKEEP_STORAGE": f"file://{work}/archive", "PGKEEP_SPOOL_DIR": f"{work}/spool",
               "PGKEEP_LISTEN": f"127.0.0.1:{http_port}", "PGKEEP_BACKUP_INTERVAL_HOURS": "0",
               "PGKEEP_VERIFY_INTERVAL_HOURS": "0", "PGKEEP_SYNCHRONOUS": "true"}
        daemon = subprocess.Popen(as_pg([binary, "daemon"], env), cwd="/", stderr=open(f"{work}/daemon.log", "w"))
        for _ in range(300):
            try:
                if json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=1))["timeline"]:
                    break
            except Exception:
                pass
            time.sleep(0.1)

        def standby(names):
            subprocess.run(psql + [f"alter system set synchronous_standby_names = '{names}'"], check=True)
            subprocess.run(psql + ["select pg_reload_conf()"], check=True, stdout=subprocess.DEVNULL)
            want = "sync" if names else "async"
            for _ in range(100):
                state = subprocess.run(psql + ["select sync_state from pg_stat_replication where application_name = 'pgkeep'"],
                                       capture_output=True, text=True).stdout.strip()
                if state == want:
                    return
                time.sleep(0.1)
            raise SystemExit(f"the daemon did not become {want} (state {state!r}); see {work}/daemon.log")

        def run(clients):
            logdir = os.path.join(work, f"log-{clients}-{time.monotonic_ns()}")
            os.makedirs(logdir)
            out = subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n",
                                  "-f", script, "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(args.seconds),
                                  "-l", "postgres"], cwd=logdir, check=True, capture_output=True, text=True).stdout
            tps = float(next(l for l in out.splitlines() if l.startswith("tps")).split()[2])
            lat = []
            for path in glob.glob(os.path.join(logdir, "pgbench_log.*")):
                with open(path) as f:
                    lat += [int(line.split()[2]) / 1000 for line in f]
            shutil.rmtree(logdir)
            return tps, lat

        results = {}
        for _ in range(args.rounds):
            for clients in (1, 8):
                for mode, names in (("async", ""), ("sync", "pgkeep")):
                    standby(names)
                    tps, lat = run(clients)
                    r = results.setdefault((clients, mode), {"tps": [], "lat": []})
                    r["tps"].append(tps)
                    r["lat"] += lat
        standby("")
        put = small_put_ms(work)
        print(f"{args.wal_segsize} MB WAL segments, file:// storage on {work}, {args.rounds} round(s) of "
              f"{args.seconds}s per case, one-row INSERT transactions")
        print(f"one small durable write (4 KiB + fsyncs) on the same file system: p50 {put:.2f} ms")
        for clients in (1, 8):
            a, s = results[(clients, "async")], results[(clients, "sync")]
            a50, a99, s50, s99 = pct(a["lat"], 50), pct(a["lat"], 99), pct(s["lat"], 50), pct(s["lat"], 99)
            atps, stps = sum(a["tps"]) / len(a["tps"]), sum(s["tps"]) / len(s["tps"])
            print(f"{clients} client(s): async p50 {a50:.2f} ms p99 {a99:.2f} ms, {atps:.0f} TPS | "
                  f"sync p50 {s50:.2f} ms p99 {s99:.2f} ms, {stps:.0f} TPS | sync/async p50 {s50 / a50:.1f}x, "
                  f"TPS {stps / atps:.2f}x; sync p50 = {s50 / put:.1f}x one small write")
    finally:
        if daemon:
            subprocess.run(["pkill", "-TERM", "-f", f"{binary} daemon"])
        subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-m", "fast", "stop"]), stdout=subprocess.DEVNULL)
        if daemon:
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
