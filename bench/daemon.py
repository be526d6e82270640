#!/usr/bin/python3
"""Benchmark of the sidecar under pgbench: daemon memory and WAL upload lag.

Starts a Postgres 15 cluster and `pgkeep daemon` (file:// storage, default settings: snappy,
the open segment's new bytes as pieces every 200 ms), runs pgbench for --seconds, and samples every 100 ms the server's WAL
insert position and the daemon's durable position (GET /status). Reports:
  - the daemon's peak RSS (VmHWM) and RSS at the end,
  - the upload lag: for each sampled server position, how long until the daemon reported it durable
    in storage (p50, p99, max), and the lag in bytes (p50, p99),
  - the pgbench TPS with and without the daemon streaming (the cost of streaming, as a ratio).

Usage: bench/daemon.py [--scale 10] [--seconds 30] [--backup] [--pgkeep target/release/pgkeep]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

from benchlib import PGBIN, ROOT, as_pg, free_port, lsn, pct


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--backup", action="store_true",
                    help="let the daemon take its first base backup during the run (peak RSS with a backup)")
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-daemon")
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
    subprocess.run(as_pg([f"{PGBIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]), check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\nmax_wal_size = '2GB'\n")
    subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-l", f"{work}/pg.log", "-w", "start"]), check=True,
                   stdout=subprocess.DEVNULL)
    psql = ["psql", "-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-c"]
    bench = [f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    daemon = None
    try:
        subprocess.run(bench + ["-i", "-s", str(args.scale), "-q", "postgres"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

        def tps(seconds):
            out = subprocess.run(bench + ["-c", "2", "-T", str(seconds), "-n", "postgres"], check=True,
                                 capture_output=True, text=True).stdout
            return float(next(l for l in out.splitlines() if l.startswith("tps")).split()[2])

        baseline = tps(min(10, args.seconds))
        env = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres",
               "PGKEEP_STORAGE": f"file://{work}/archive", "PGKEEP_SPOOL_DIR": f"{work}/spool",
               "PGKEEP_LISTEN": f"127.0.0.1:{http_port}",
               # --backup: the schedule's first backup (storage holds none) runs while pgbench writes.
               "PGKEEP_BACKUP_INTERVAL_HOURS": "24" if args.backup else "0"}
        daemon = subprocess.Popen(as_pg([binary, "daemon"], env), cwd="/", stderr=open(f"{work}/daemon.log", "w"))
        status_url = f"http://127.0.0.1:{http_port}/status"
        for _ in range(300):
            try:
                if json.load(urllib.request.urlopen(status_url, timeout=1))["timeline"]:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        pid = subprocess.run(["pgrep", "-f", f"{binary} daemon"], capture_output=True, text=True).stdout.split()[-1]
        load = subprocess.Popen(bench + ["-c", "2", "-T", str(args.seconds), "-n", "postgres"], stdout=subprocess.PIPE,
                                text=True)
        samples = []  # (time, server lsn, durable lsn)
        while load.poll() is None:
            server = lsn(subprocess.run(psql + ["select pg_current_wal_insert_lsn()"], capture_output=True,
                                        text=True).stdout)
            durable = lsn(json.load(urllib.request.urlopen(status_url, timeout=5))["durable_lsn"])
            samples.append((time.monotonic(), server, durable))
            time.sleep(0.1)
        streamed_tps = float(next(l for l in load.stdout.read().splitlines() if l.startswith("tps")).split()[2])
        # Let the tail become durable, sampling on.
        end = time.monotonic() + 15
        while time.monotonic() < end:
            durable = lsn(json.load(urllib.request.urlopen(status_url, timeout=5))["durable_lsn"])
            samples.append((time.monotonic(), samples[-1][1], durable))
            time.sleep(0.1)
        with open(f"/proc/{pid}/status") as f:
            mem = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmHWM", "VmRSS"))}
        lags, lag_bytes = [], []
        for i, (t, server, _) in enumerate(samples):
            done = next((t2 for (t2, _, d) in samples[i:] if d >= server), None)
            if done is not None:
                lags.append(done - t)
            lag_bytes.append(max(0, server - samples[i][2]))
        mb = 1024 * 1024
        print(f"pgbench scale {args.scale}, 2 clients, {args.seconds}s, {len(samples)} samples")
        print(f"daemon peak RSS {mem['VmHWM'] / 1024:.1f} MB, RSS at end {mem['VmRSS'] / 1024:.1f} MB")
        print(f"WAL upload lag (server position -> durable in storage): p50 {pct(lags, 50):.2f}s, "
              f"p99 {pct(lags, 99):.2f}s, max {max(lags):.2f}s")
        print(f"lag in bytes: p50 {pct(lag_bytes, 50) / mb:.1f} MB, p99 {pct(lag_bytes, 99) / mb:.1f} MB")
        print(f"pgbench TPS: {baseline:.0f} without the daemon, {streamed_tps:.0f} while streaming "
              f"({streamed_tps / baseline:.2f}x)")
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
