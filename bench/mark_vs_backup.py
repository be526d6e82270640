#!/usr/bin/python3
"""Benchmark: what the chart's pre-upgrade hook costs, a mark against a full base backup (#19).

Starts a Postgres 15 cluster with pgbench data (--scale, 15 MB per unit) and `pgkeep daemon` on
file:// storage, then, in one invocation and interleaved, times `pgkeep mark` (a restore point, a
WAL switch, a record once that WAL is in storage) and `pgkeep backup` (a full base backup), and
prints medians and the ratio.

Usage: bench/mark_vs_backup.py [--scale 50] [--rounds 3] [--pgkeep target/release/pgkeep]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

from sync_commit import PGBIN, ROOT, as_pg, free_port  # the same helpers as the sync bench


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-mark")
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
    subprocess.run(as_pg([f"{PGBIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n"
                "max_wal_size = '4GB'\n")
    subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-l", f"{work}/pg.log", "-w", "start"]), check=True,
                   stdout=subprocess.DEVNULL)
    daemon = None
    try:
        subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-i", "-q",
                        "-s", str(args.scale), "postgres"], check=True, capture_output=True)
        env = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres",
               "PGKEEP_STORAGE": f"file://{work}/archive", "PGKEEP_SPOOL_DIR": f"{work}/spool",
               "PGKEEP_LISTEN": f"127.0.0.1:{http_port}", "PGKEEP_BACKUP_INTERVAL_HOURS": "0",
               "PGKEEP_VERIFY_INTERVAL_HOURS": "0", "PGKEEP_HTTP_TOKEN_FILE": f"{work}/spool/http-token"}
        daemon = subprocess.Popen(as_pg([binary, "daemon"], env), cwd="/", stderr=open(f"{work}/daemon.log", "w"))
        for _ in range(300):
            try:
                if json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=1))["timeline"]:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        size = subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                               "-c", "select pg_size_pretty(pg_database_size('postgres'))"],
                              capture_output=True, text=True).stdout.strip()

        def timed(cmd):
            t = time.perf_counter()
            r = subprocess.run(as_pg([binary, *cmd], env), cwd="/", capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{cmd}: {r.stderr}")
            return time.perf_counter() - t

        marks, fulls = [], []
        for i in range(args.rounds):
            marks.append(timed(["mark", f"bench-{i}", "--note", "bench"]))
            fulls.append(timed(["backup"]))
        m, b = statistics.median(marks), statistics.median(fulls)
        print(f"database {size} (pgbench scale {args.scale}), file:// storage, {args.rounds} interleaved rounds")
        print(f"mark: median {m:.2f} s ({', '.join(f'{x:.2f}' for x in marks)})")
        print(f"full backup: median {b:.2f} s ({', '.join(f'{x:.2f}' for x in fulls)})")
        print(f"mark / full backup: {m / b:.3f}x ({b / m:.0f} times faster)")
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
