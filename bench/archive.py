#!/usr/bin/python3
"""Benchmark: archive_command = 'pgkeep archive-push %p' against 'cp' (#17).

One Postgres 15 cluster (archive_mode = on, pgbench scale --scale). In --rounds interleaved rounds,
pgbench (--clients clients, --seconds seconds; --load bulk, the default: transactions of 2000
1 KB rows, WAL-heavy; --load tpcb: pgbench's own) runs while the archiver uses, in turn:
  cp:        test ! -f DIR/%f && cp %p DIR/%f          (a local folder, no fsync)
  file://:   pgkeep archive-push %p                    (to a local folder, fsynced, read back)
  s3:        pgkeep archive-push %p                    (to the S3 test server on loopback; the store checks the
                                                        signed SHA-256, no read-back)
  daemon:    pgkeep archive-push %p                    (to file://, with the daemon streaming there:
                                                        archive-push hashes the segment and takes the
                                                        daemon's proven word that its stream stored it)
and reports for each the WAL archived per second during the load (pg_stat_archiver) and the
backlog left when the load ended (segments still .ready), medians over the rounds, with ratios to
cp; and the CPU time spent per archived segment by archive_command (the archiver's children) and,
for s3, by the S3 server, which shares the machine's cores with the load here. Between rounds the archiver catches up, so each round starts with no backlog.

Usage: bench/archive.py [--seconds 30] [--rounds 3] [--clients 4] [--scale 10] [--pgkeep target/release/pgkeep]
"""
import argparse
import os
import shlex
import shutil
import statistics
import sys
import time

from benchlib import S3, Cluster, Daemon, lsn, workdir

MB = 1024 * 1024


def cpu_seconds(pid, children=False):
    """User + system CPU seconds of process `pid` (of its waited-for children with `children`)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime are fields 14-17 of stat; fields[0] here is field 3.
    ticks = int(fields[13]) + int(fields[14]) if children else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def archiver_pid(cluster):
    return int(cluster.sql("select pid from pg_stat_activity where backend_type = 'archiver'"))


def archived(cluster):
    return int(cluster.sql("select archived_count from pg_stat_archiver"))


def backlog(cluster):
    folder = os.path.join(cluster.data, "pg_wal", "archive_status")
    return sum(1 for f in os.listdir(folder) if f.endswith(".ready"))


def empty(folder):
    """Removes what is in `folder` (kept itself, with its owner)."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        # (An archive_command replaced a moment ago may still be writing: what it adds stays.)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


def drop_slot(cluster, name="pgkeep"):
    """Drops the daemon's slot once its walsender has noticed the daemon is gone."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        active = cluster.sql(f"select active from pg_replication_slots where slot_name = '{name}'")
        if active.strip() in ("", "f"):
            if active.strip() == "f":
                cluster.sql(f"select pg_drop_replication_slot('{name}')")
            return
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--load", default="bulk", choices=["bulk", "tpcb"],
                    help="bulk: each transaction inserts 2000 rows of 1 KB (WAL-heavy, tens of MB/s); "
                         "tpcb: pgbench's own transactions (a few MB/s, which any archiver keeps up with)")
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-archive")
    args = ap.parse_args()
    work = args.workdir
    binary = workdir(work, args.pgkeep)
    s3 = S3(work)
    cp_dir = os.path.join(work, "cp-archive")
    os.makedirs(cp_dir)
    if os.getuid() == 0:
        shutil.chown(cp_dir, "postgres", "postgres")
    cluster = Cluster(work, conf="archive_mode = on\narchive_command = ''\nwal_level = replica\n")
    env_s3 = " ".join(f"{k}={shlex.quote(v)}" for k, v in
                      {"PGKEEP_STORAGE": f"s3://{S3.BUCKET}/db", **s3.env()}.items())
    commands = {
        "cp": f"test ! -f {cp_dir}/%f && cp %p {cp_dir}/%f",
        "file://": f"env PGKEEP_STORAGE=file://{work}/archive PGKEEP_LOG_LEVEL=warn {binary} archive-push %p",
        "s3": f"env {env_s3} PGKEEP_LOG_LEVEL=warn {binary} archive-push %p",
        "daemon": None,  # set once the daemon runs (its port)
    }
    results = {name: {"rate": [], "backlog": []} for name in commands}
    try:
        cluster.pgbench("-i", "-s", str(args.scale), "-q")
        script = os.path.join(work, "bulk.sql")
        with open(script, "w") as f:
            f.write("insert into bulk select g, repeat(md5(random()::text), 32) from generate_series(1, 2000) g;\n")
        cluster.sql("create table bulk (id int, v text)")
        load = ["-f", script] if args.load == "bulk" else []
        seg = int(cluster.sql("select setting from pg_settings where name = 'wal_segment_size'"))
        for _ in range(args.rounds):
            for name, command in commands.items():
                # What earlier runs archived and inserted is not kept: the load writes gigabytes.
                cluster.sql("truncate bulk")
                empty(cp_dir)
                for folder in ("archive", "archive-daemon", os.path.join("s3", S3.BUCKET)):
                    empty(os.path.join(work, folder))
                daemon = None
                if name == "daemon":
                    daemon = Daemon(binary, work, cluster, {"PGKEEP_STORAGE": f"file://{work}/archive-daemon",
                                                            "PGKEEP_LOG_LEVEL": "warn"})
                    command = (f"env PGKEEP_STORAGE=file://{work}/archive-daemon PGKEEP_LOG_LEVEL=warn "
                               f"PGKEEP_LISTEN=127.0.0.1:{daemon.http} "
                               f"PGKEEP_HTTP_TOKEN_FILE={work}/spool/http-token {binary} archive-push %p")
                cluster.set("archive_command", command)
                # Start with no backlog: the previous round's tail archived by this command.
                cluster.sql("select pg_switch_wal()")
                end = time.monotonic() + 300
                while backlog(cluster) and time.monotonic() < end:
                    time.sleep(0.2)
                archiver = archiver_pid(cluster)
                cpu_before = cpu_seconds(archiver, children=True)
                server_before = cpu_seconds(s3.proc.pid)
                before, t = archived(cluster), time.monotonic()
                cluster.pgbench("-n", *load, "-c", str(args.clients), "-j", "2", "-T", str(args.seconds))
                elapsed = time.monotonic() - t
                done = archived(cluster) - before
                results[name]["rate"].append(done * seg / elapsed)
                results[name]["backlog"].append(backlog(cluster))
                if done:
                    results[name].setdefault("cpu_ms", []).append(
                        (cpu_seconds(archiver, children=True) - cpu_before) * 1000 / done)
                    if name == "s3":
                        results[name].setdefault("server_ms", []).append(
                            (cpu_seconds(s3.proc.pid) - server_before) * 1000 / done)
                if daemon:
                    st = daemon.status()
                    lag = (lsn(st["received_lsn"]) - lsn(st["durable_lsn"])) / seg
                    results[name].setdefault("daemon_lag", []).append(lag)
                    # Its archive_command catches up before the daemon goes: the next round starts
                    # with no backlog, and the slot is dropped so that WAL is not kept meanwhile.
                    cluster.sql("select pg_switch_wal()")
                    end = time.monotonic() + 300
                    while backlog(cluster) and time.monotonic() < end:
                        time.sleep(0.2)
                    daemon.stop()
                    drop_slot(cluster)
        failed = cluster.sql("select failed_count from pg_stat_archiver")
    finally:
        cluster.stop()
        s3.stop()
    cp_rate = statistics.median(results["cp"]["rate"])
    print(f"pgbench scale {args.scale}, load {args.load}, {args.clients} clients, {args.seconds} s per round, "
          f"{args.rounds} rounds interleaved; archiver failures {failed}")
    for name, r in results.items():
        rate = statistics.median(r["rate"])
        extra = ""
        if "daemon_lag" in r:
            extra = f"; the daemon's upload lag at the end {statistics.median(r['daemon_lag']):.1f} segments"
        if "cpu_ms" in r:
            extra += f"; CPU per segment: archive_command {statistics.median(r['cpu_ms']):.0f} ms"
        if "server_ms" in r:
            extra += f", the S3 server {statistics.median(r['server_ms']):.0f} ms"
        print(f"{name:8} {rate / MB:6.1f} MB/s archived ({rate / cp_rate:.2f}x cp), backlog at the end "
              f"{statistics.median(r['backlog']):.0f} segments (rounds: {', '.join(str(b) for b in r['backlog'])}){extra}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
