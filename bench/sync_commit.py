#!/usr/bin/python3
"""Benchmark: the commit latency synchronous mode adds (#15).

Starts a Postgres 15 cluster (--wal-segsize MB segments) and `pgkeep daemon` with
`synchronous = true`, on file:// and on a real S3 server (the S3 test server on loopback), then runs, in one invocation and interleaved, a pgbench
script of one-row INSERT transactions with 1 and with 8 clients:
  async:  synchronous_standby_names = ''        (the daemon streams; commits do not wait for it)
  sync:   synchronous_standby_names = 'pgkeep'  (each COMMIT waits until its WAL is in storage)
  floor:  synchronous_standby_names = 'pg_receivewal', Postgres' own `pg_receivewal --synchronous`
          writing and fsyncing into a local folder: what any synchronous WAL receiver costs here
          (the walsender's wake-up, the round trip, a local fsync), with nothing uploaded
and prints per-transaction latency p50/p99 (pgbench -l) and TPS, with sync/async ratios, and the
time of one small write to the same storage, the floor of one upload there (file://: 4 KiB
written, fsynced, renamed, folder fsynced; S3: one signed 4 KiB PUT on a kept-alive connection).

Usage: bench/sync_commit.py [--storage file,s3] [--seconds 10] [--wal-segsize 16] [--rounds 2] [--pgkeep target/release/pgkeep]
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

from benchlib import PGBIN, Cluster, Daemon, S3, as_pg, pct, small_put_ms, storage_env, tps_of, workdir


def run_storage(kind, args, binary, work):
    s3 = S3(work) if kind == "s3" else None
    cluster = Cluster(work, conf="synchronous_commit = on\n", initdb_args=[f"--wal-segsize={args.wal_segsize}"])
    daemon = None
    try:
        cluster.sql("create table probe (id bigserial primary key, at timestamptz default now())")
        script = os.path.join(work, "insert.sql")
        with open(script, "w") as f:
            f.write("insert into probe default values;\n")
        daemon = Daemon(binary, work, cluster, {**storage_env(kind, work, s3), "PGKEEP_SYNCHRONOUS": "true"})
        received = os.path.join(work, "receivewal")
        os.makedirs(received)
        if os.getuid() == 0:
            shutil.chown(received, "postgres", "postgres")
        receivewal = subprocess.Popen(as_pg([f"{PGBIN}/pg_receivewal", "-h", "127.0.0.1", "-p", str(cluster.port),
                                             "-U", "postgres", "-D", received, "--synchronous", "-n"]),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def standby(names):
            cluster.set("synchronous_standby_names", names)
            want = "sync" if names else "async"
            who = names or "pgkeep"
            for _ in range(100):
                state = cluster.sql(f"select sync_state from pg_stat_replication where application_name = '{who}'")
                if state == want:
                    return
                time.sleep(0.1)
            raise SystemExit(f"the daemon did not become {want} (state {state!r}); see {work}/daemon.log")

        def run(clients):
            logdir = os.path.join(work, f"log-{clients}-{time.monotonic_ns()}")
            os.makedirs(logdir)
            out = cluster.pgbench("-n", "-f", script, "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                                  str(args.seconds), "-l", cwd=logdir)
            lat = []
            for path in glob.glob(os.path.join(logdir, "pgbench_log.*")):
                with open(path) as f:
                    lat += [int(line.split()[2]) / 1000 for line in f]
            shutil.rmtree(logdir)
            return tps_of(out), lat

        results = {}
        for _ in range(args.rounds):
            for clients in (1, 8):
                for mode, names in (("async", ""), ("sync", "pgkeep"), ("floor", "pg_receivewal")):
                    standby(names)
                    tps, lat = run(clients)
                    r = results.setdefault((clients, mode), {"tps": [], "lat": []})
                    r["tps"].append(tps)
                    r["lat"] += lat
        standby("")
        put = small_put_ms(kind, work, s3)
    finally:
        if daemon:
            daemon.stop()
            receivewal.kill()
        cluster.stop()
        if s3:
            s3.stop()
    floor = "one signed 4 KiB PUT" if kind == "s3" else "one small durable write (4 KiB + fsyncs)"
    print(f"== {kind} storage: {args.wal_segsize} MB WAL segments, {args.rounds} round(s) of {args.seconds}s per "
          f"case, one-row INSERT transactions")
    print(f"{floor} to the same storage: p50 {put:.2f} ms")
    for clients in (1, 8):
        a, s, f = results[(clients, "async")], results[(clients, "sync")], results[(clients, "floor")]
        a50, a99, s50, s99 = pct(a["lat"], 50), pct(a["lat"], 99), pct(s["lat"], 50), pct(s["lat"], 99)
        f50, f99 = pct(f["lat"], 50), pct(f["lat"], 99)
        atps, stps = sum(a["tps"]) / len(a["tps"]), sum(s["tps"]) / len(s["tps"])
        print(f"{clients} client(s): async p50 {a50:.2f} ms p99 {a99:.2f} ms, {atps:.0f} TPS | "
              f"sync p50 {s50:.2f} ms p99 {s99:.2f} ms, {stps:.0f} TPS | sync/async p50 {s50 / a50:.1f}x, "
              f"TPS {stps / atps:.2f}x; sync p50 = {s50 / put:.1f}x the small PUT")
        print(f"  floor (pg_receivewal --synchronous): p50 {f50:.2f} ms p99 {f99:.2f} ms; pgkeep's sync p50 above "
              f"that floor: {s50 - f50:.2f} ms = {(s50 - f50) / put:.1f}x the small PUT")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="file,s3")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--wal-segsize", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-sync")
    args = ap.parse_args()
    for kind in args.storage.split(","):
        work = f"{args.workdir}-{kind}"
        run_storage(kind, args, workdir(work, args.pgkeep), work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
