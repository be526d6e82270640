#!/usr/bin/python3
"""Benchmark: how much a lost pod loses (#15), on file:// and on a real S3 server (tools/s3-server).

For each storage, one Postgres 15 cluster (pgbench scale --scale) and `pgkeep daemon` at its
default settings (the open segment's new bytes uploaded as pieces every 200 ms):

1. Commit-to-durable delay: probe transactions committed --probe-hz times a second on one kept
   connection, each timed from its COMMIT returning (the position read right after it,
   pg_current_wal_lsn(), which is at or past its commit record) until the daemon's /status
   durable_lsn passes it, polled every 10 ms. p50/p99/max, idle and under pgbench (2 clients).
2. pgbench TPS while the daemon streams against TPS with archive_command = 'cp %p …' and no
   daemon, --rounds interleaved rounds (medians); the daemon catches up on the WAL written while
   it was stopped before its round starts.
3. Bytes uploaded for the open segment at a trickle of WAL (1 commit a second for --trickle
   seconds, from 8 MiB into a segment), from /status partial_bytes_uploaded, as bytes per hour:
   pieces (the default, partial_max_pieces = 32) against whole-prefix partials at the same
   interval (partial_max_pieces = 0, layout 1's way) and against the old defaults (whole prefix
   every 5 s).

Usage: bench/rpo.py [--storage file,s3] [--seconds 20] [--rounds 2] [--trickle 30] [--scale 10]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from benchlib import PGBIN, Cluster, Daemon, S3, lsn, pct, storage_env, tps_of, workdir

MB = 1024 * 1024


class Probe:
    """Commits one row `hz` times a second; records (time the COMMIT returned, its LSN)."""

    def __init__(self, cluster, hz):
        self.proc = subprocess.Popen(cluster.psql_cmd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.hz, self.commits, self.stop_flag = hz, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        period = 1.0 / self.hz
        next_at = time.monotonic()
        while not self.stop_flag.is_set():
            self.proc.stdin.write("insert into probe default values; select pg_current_wal_lsn();\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            self.commits.append((time.monotonic(), lsn(line)))
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))

    def stop(self):
        self.stop_flag.set()
        self.thread.join()
        self.proc.stdin.close()
        self.proc.wait()
        return self.commits


class Poller:
    """Samples the daemon's durable position every 10 ms."""

    def __init__(self, daemon):
        self.daemon, self.samples, self.stop_flag = daemon, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_flag.is_set():
            d = self.daemon.durable()
            self.samples.append((time.monotonic(), d))
            time.sleep(0.01)

    def stop(self):
        self.stop_flag.set()
        self.thread.join()
        return self.samples


def delays(commits, samples):
    """For each commit, seconds until a sample taken after it shows it durable (None: never)."""
    out, j = [], 0
    for t, pos in commits:
        while j < len(samples) and samples[j][0] < t:
            j += 1
        k = j
        while k < len(samples) and samples[k][1] < pos:
            k += 1
        out.append(samples[k][0] - t if k < len(samples) else None)
    return out


def measure(cluster, daemon, hz, seconds, load=None):
    """Probes for `seconds` (while `load` runs, if given); returns (delays, load's output)."""
    poller = Poller(daemon)
    bench = (subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             if load else None)
    probe = Probe(cluster, hz)
    time.sleep(seconds)
    out = bench.communicate()[0] if bench else None
    commits = probe.stop()
    time.sleep(3)  # the last commits' upload
    d = delays(commits, poller.stop())
    return d, out


def summary(d):
    done = [x for x in d if x is not None]
    missing = len(d) - len(done)
    text = (f"p50 {pct(done, 50) * 1000:.0f} ms, p99 {pct(done, 99) * 1000:.0f} ms, "
            f"max {max(done) * 1000:.0f} ms ({len(done)} commits")
    return text + (f", {missing} never durable)" if missing else ")")


def run_storage(kind, args, binary, work):
    s3 = S3(work) if kind == "s3" else None
    cluster = Cluster(work, conf="wal_level = replica\n")
    archive_dir = os.path.join(work, "cp-archive")
    os.makedirs(archive_dir)
    if os.getuid() == 0:
        shutil.chown(archive_dir, "postgres", "postgres")
    daemon = None
    results = {}
    try:
        cluster.sql("create table probe (id bigserial primary key, at timestamptz default now())")
        cluster.pgbench("-i", "-s", str(args.scale), "-q")
        env = storage_env(kind, work, s3)
        load = [f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-n", "-c", "2",
                "-j", "2", "-T", str(args.seconds), "postgres"]

        daemon = Daemon(binary, work, cluster, env)
        daemon.catch_up(cluster)
        results["idle"], _ = measure(cluster, daemon, args.probe_hz, args.seconds)
        loaded, tps_daemon, tps_cp = [], [], []
        for _ in range(args.rounds):
            if daemon is None:
                daemon = Daemon(binary, work, cluster, env)
            daemon.catch_up(cluster)
            d, out = measure(cluster, daemon, args.probe_hz, args.seconds, load)
            loaded += d
            tps_daemon.append(tps_of(out))
            daemon.stop()
            daemon = None
            cluster.set("archive_command", f"test ! -f {archive_dir}/%f && cp %p {archive_dir}/%f")
            cluster.set("archive_mode", "on", restart=True)
            # The same probe load beside pgbench, as in the daemon's round.
            probe = Probe(cluster, args.probe_hz)
            tps_cp.append(tps_of(cluster.pgbench("-n", "-c", "2", "-j", "2", "-T", str(args.seconds))))
            probe.stop()
            cluster.set("archive_mode", "off", restart=True)
        results["pgbench"] = loaded

        trickle = {}
        for label, extra in (("pieces (defaults: 200 ms, partial_max_pieces 32)", {}),
                             ("whole prefix every 200 ms (partial_max_pieces 0)", {"PGKEEP_PARTIAL_MAX_PIECES": "0"}),
                             ("old defaults: whole prefix every 5 s",
                              {"PGKEEP_PARTIAL_MAX_PIECES": "0", "PGKEEP_PARTIAL_UPLOAD_MS": "5000"})):
            # The same start for each: 8 MiB into a fresh segment (the middle of a segment's life,
            # so that a whole-prefix upload is its average size).
            cluster.sql("select pg_switch_wal()")
            # Hex of random hashes: not something snappy shrinks to nothing, as repeat('x') was.
            cluster.sql("select pg_logical_emit_message(false, 'bench', (select string_agg(md5(random()::text), '') "
                        "from generate_series(1, 262000)))")
            daemon = Daemon(binary, work, cluster, {**env, **extra})
            daemon.catch_up(cluster)
            before = daemon.status()
            start = time.monotonic()
            d, _ = measure(cluster, daemon, 1, args.trickle)
            after = daemon.status()
            hours = (time.monotonic() - start) / 3600
            sent = after["partial_bytes_uploaded"] - before["partial_bytes_uploaded"]
            uploads = after["partial_uploads"] - before["partial_uploads"]
            trickle[label] = (sent / hours, uploads / hours, d)
            daemon.stop()
            daemon = None
    finally:
        if daemon:
            daemon.stop()
        cluster.stop()
        if s3:
            s3.stop()
    return results, tps_daemon, tps_cp, trickle


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="file,s3")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trickle", type=int, default=30)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--probe-hz", type=int, default=10)
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-rpo")
    args = ap.parse_args()
    for kind in args.storage.split(","):
        work = f"{args.workdir}-{kind}"
        binary = workdir(work, args.pgkeep)
        results, tps_daemon, tps_cp, trickle = run_storage(kind, args, binary, work)
        print(f"== {kind} storage (pgbench scale {args.scale}, 2 clients, {args.seconds} s per case)")
        print(f"commit-to-durable, idle:          {summary(results['idle'])}")
        print(f"commit-to-durable, under pgbench: {summary(results['pgbench'])}")
        td, tc = statistics.median(tps_daemon), statistics.median(tps_cp)
        print(f"pgbench TPS: daemon streaming {td:.0f} (rounds {', '.join(f'{x:.0f}' for x in tps_daemon)}), "
              f"archive_command = cp {tc:.0f} (rounds {', '.join(f'{x:.0f}' for x in tps_cp)}): {td / tc:.2f}x")
        base = next(iter(trickle.values()))[0]
        for label, (per_hour, uploads, d) in trickle.items():
            print(f"trickle, 1 commit/s, {label}: {per_hour / MB:.1f} MB/h in {uploads:.0f} uploads/h "
                  f"({per_hour / base:.1f}x pieces); commit-to-durable {summary(d)}")
        sys.stdout.flush()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
