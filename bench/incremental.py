#!/usr/bin/python3
"""Benchmark: incremental base backups against full ones, in one run on one pgbench cluster.

On Postgres 17 (summarize_wal = on; --major to change), file:// storage, snappy:
  1. a full backup;
  2. an UPDATE of --update-pct of pgbench_accounts in one contiguous range of aid (as a day's writes
     to recent rows usually are), then an incremental backup and, at the same point, a full one:
     the incremental's stored bytes and time against that full one's;
  3. pgbench's own random workload (--seconds), then a second incremental and a full one at the
     same point: reported as they come out;
  4. restore of the full + 2 incrementals against a restore of the full taken at the same point.
With --delta-major 15 (the default; 0: skip) the same steps 1-2 on Postgres 15, where an incremental
backup is a file-level delta: files unchanged since the parent are references (a changed table's
1 GB segment is stored again whole).

Usage: bench/incremental.py [--scale 50] [--major 17] [--pgkeep target/release/pgkeep] [--workdir DIR]
Runs as root (clusters and pgkeep then run as the postgres user) or as a normal user.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import benchlib
from benchlib import ROOT, as_pg, workdir

CACHE = os.environ.get("PGKEEP_PG_CACHE", "/var/tmp/pgkeep-postgres")


def server_bin(major):
    return "/usr/lib/postgresql/15/bin" if major == 15 else os.path.join(CACHE, str(major), "native/bin")


def timed(cmd, env=None):
    t = time.monotonic()
    out = subprocess.run(as_pg(cmd, env), capture_output=True, text=True, cwd="/")
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    if os.environ.get("BENCH_LOG") and "backup" in cmd:
        print(out.stderr, file=sys.stderr)
    return time.monotonic() - t, out.stdout.strip()


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    if ROOT:
        shutil.chown(path, "postgres", "postgres")
    return path


def run_major(major, args, steps):
    work = os.path.join(args.workdir, f"pg{major}")
    binary = workdir(work, os.path.abspath(args.pgkeep))
    # The chain goes to one archive; the full backups "at the same point" to another, so that they
    # never become the parent of an incremental. Postgres archives its WAL to both.
    confs = []
    for name in ("chain", "fulls"):
        archive = fresh(os.path.join(work, name))
        conf = os.path.join(work, f"{name}.toml")
        with open(conf, "w") as f:
            f.write(f'storage = "file://{archive}"\n')
        confs.append(conf)
    benchlib.PGBIN = server_bin(major)
    extra = "summarize_wal = on\n" if major >= 17 else ""
    push = " && ".join(f"{binary} --config {conf} archive-push %p" for conf in confs)
    c = benchlib.Cluster(work, conf=f"archive_mode = on\narchive_command = '{push}'\n"
                                    f"max_wal_size = '4GB'\n{extra}",
                         initdb_args=("-E", "UTF8", "--locale=C"))
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(c.port), "PGUSER": "postgres"}
    pgkeep = [binary, "--config", confs[0]]
    fulls = [binary, "--config", confs[1]]
    results = {}
    try:
        c.pgbench("-i", "-s", str(args.scale), "-q")
        c.sql("checkpoint")
        time.sleep(1.1)  # files written in the second a backup starts are not left out by a delta

        def backup(cmd, flag):
            return timed([*cmd, "backup", flag], env)

        def summarized():
            """Waits until the WAL summarizer has read the WAL written so far (in production it runs
            all day; right after a burst of writes BASE_BACKUP (INCREMENTAL) waits for it, and that
            wait is reported apart). Returns the seconds waited."""
            if major < 17:
                return 0.0
            lsn = c.sql("select pg_current_wal_flush_lsn()")
            t = time.monotonic()
            while c.sql(f"select (select pending_lsn from pg_get_wal_summarizer_state()) >= '{lsn}'::pg_lsn") != "t":
                if time.monotonic() - t > 120:
                    sys.exit("the WAL summarizer did not catch up in 120 s")
                time.sleep(0.05)
            return time.monotonic() - t

        def stored(cmd, bid):
            # Ids are start times: one archive's may equal the other's.
            listing = json.loads(timed([*cmd, "list", "--json"])[1])
            b = next(b for b in listing["backups"] if b["id"] == bid)
            return b["stored_bytes"], b["plain_bytes"], b.get("kind", "full")

        backup(pgkeep, "--full")
        rows = int(c.sql("select count(*) from pgbench_accounts"))
        n = rows * args.update_pct // 100
        first = rows // 2
        c.sql(f"update pgbench_accounts set abalance = abalance + 1 where aid between {first} and {first + n - 1}")
        c.sql("checkpoint")
        results["summarizer"] = [summarized()]
        t_inc, inc1 = backup(pgkeep, "--incremental")
        t_full, full1 = backup(fulls, "--full")
        results["contiguous"] = (t_inc, stored(pgkeep, inc1), t_full, stored(fulls, full1))
        if "random" in steps:
            c.pgbench("-c", "2", "-T", str(args.seconds), "-n")
            c.sql("checkpoint")
            results["summarizer"].append(summarized())
            t_inc2, inc2 = backup(pgkeep, "--incremental")
            t_full2, full2 = backup(fulls, "--full")
            results["random"] = (t_inc2, stored(pgkeep, inc2), t_full2, stored(fulls, full2))
            c.sql("select pg_switch_wal()")
            time.sleep(2)
            # The chain (full + 2 incrementals) against the full taken at the same point: each
            # restored into a fresh directory, best of two.
            def restore(cmd, bid):
                best = None
                for _ in range(2):
                    target = fresh(os.path.join(work, "restored"))
                    t, _ = timed([*cmd, "restore", "--target-dir", target, "--backup", bid])
                    best = t if best is None else min(best, t)
                return best
            chain = json.loads(timed([*pgkeep, "list", "--json"])[1])
            results["restore"] = (restore(pgkeep, inc2), restore(fulls, full2), inc2, chain)
    finally:
        c.stop()
    return results


def report(major, results):
    mb = 1 << 20
    for name, label in (("contiguous", "contiguous UPDATE"), ("random", "pgbench random")):
        if name not in results:
            continue
        t_inc, (s_inc, p_inc, kind), t_full, (s_full, p_full, _) = results[name]
        print(f"PG{major} {label:<18} {kind:<12} {s_inc / mb:8.1f} MB stored in {t_inc:6.2f} s | full "
              f"{s_full / mb:8.1f} MB in {t_full:6.2f} s | bytes {s_inc / s_full:6.1%}, time {t_inc / t_full:6.1%}")
    if major >= 17:
        waits = ", ".join(f"{w:.2f} s" for w in results["summarizer"])
        print(f"PG{major} before each incremental the WAL summarizer caught up with the writes in: {waits} "
              f"(not counted above; BASE_BACKUP (INCREMENTAL) waits for it)")
    if "restore" in results:
        t_chain, t_full, inc2, listing = results["restore"]
        by_id = {b["id"]: b for b in listing["backups"]}
        depth, b = 1, by_id[inc2]
        while b.get("parent"):
            depth, b = depth + 1, by_id[b["parent"]]
        print(f"PG{major} restore of a chain of {depth} (full + {depth - 1} incrementals): {t_chain:.2f} s; "
              f"a full at the same point: {t_full:.2f} s; ratio {t_chain / t_full:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--major", type=int, default=17)
    ap.add_argument("--delta-major", type=int, default=15, help="the file-level delta's major (0: skip)")
    ap.add_argument("--update-pct", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=20, help="pgbench's random workload before the second incremental")
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-incremental")
    args = ap.parse_args()
    fresh(args.workdir)
    os.chmod(args.workdir, 0o755)
    report(args.major, run_major(args.major, args, {"random"}))
    if args.delta_major:
        report(args.delta_major, run_major(args.delta_major, args, set()))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
