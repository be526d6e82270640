#!/usr/bin/python3
"""Benchmark: WAL replay through restore_command against `cp` (#17).

One Postgres 15 cluster writes --wal-mb of pgbench WAL after a `pgkeep backup`; its archive_command
copies each segment to a local folder (for `cp`) and archives it with `pgkeep archive-push` (for
pgkeep). The backup is restored once; each round copies that data directory and starts it with,
in turn (interleaved, --rounds rounds, medians):
  cp:         restore_command = cp DIR/%f %p
  wal-fetch:  pgkeep wal-fetch %f %p with no daemon: the first segment read from storage starts
              wal-fetch's own prefetch (a short-lived helper) into a hand-off directory of its own
  daemon:     pgkeep wal-fetch %f %p with `pgkeep daemon` running beside it: segments it prefetched
              are taken from the shared hand-off directory (prefetch_dir)
timing from `pg_ctl start` until recovery ends ("archive recovery complete" in the log), with
ratios to cp. Then, with the daemon, the time of one `pgkeep wal-fetch` of a prefetched segment
(the whole process, as Postgres runs it) against `pgkeep --version` (starting the binary) and
`cp` of the same segment, p50/p99 over --samples segments (each run as postgres through runuser
when the bench runs as root, which adds the same few milliseconds to all three).

Usage: bench/replay.py [--wal-mb 512] [--rounds 3] [--storage file|s3] [--samples 30] [--pgkeep target/release/pgkeep]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import PGBIN, S3, Cluster, Daemon, as_pg, free_port, lsn, pct, storage_env, workdir

MB = 1024 * 1024


def timed_recovery(work, pristine, name, restore_command):
    """Copies the restored data directory, starts it with `restore_command`, and times recovery."""
    data = os.path.join(work, f"replay-{name}")
    shutil.rmtree(data, ignore_errors=True)
    subprocess.run(["cp", "-a", pristine, data], check=True)
    with open(os.path.join(data, "postgresql.auto.conf"), "a") as f:
        f.write(f"\nrestore_command = '{restore_command}'\narchive_mode = off\nport = {free_port()}\n")
    log = os.path.join(work, f"replay-{name}.log")
    if os.path.exists(log):
        os.remove(log)
    started = time.monotonic()
    subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-l", log, "start"]), check=True,
                   stdout=subprocess.DEVNULL)
    while True:
        text = open(log).read() if os.path.exists(log) else ""
        if "archive recovery complete" in text or "database system is ready to accept connections" in text:
            took = time.monotonic() - started
            break
        if "FATAL" in text or time.monotonic() - started > 1800:
            raise SystemExit(f"{name}: recovery failed; see {log}")
        time.sleep(0.005)
    subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-m", "immediate", "stop"]), stdout=subprocess.DEVNULL)
    restored = text.count("restored log file")
    shutil.rmtree(data, ignore_errors=True)
    return took, restored, text


def run_as_pg_timed(cmd, env):
    t = time.perf_counter()
    subprocess.run(as_pg(cmd, env), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wal-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--storage", default="file", choices=["file", "s3"])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench-replay")
    ap.add_argument("--daemon-log", default="info", help="the daemon's log level (debug: each prefetch, timed)")
    args = ap.parse_args()
    work = args.workdir
    binary = workdir(work, args.pgkeep)
    s3 = S3(work) if args.storage == "s3" else None
    env = storage_env(args.storage, work, s3)
    env_words = " ".join(f"{k}={v}" for k, v in env.items())
    cp_dir = os.path.join(work, "cp-archive")
    os.makedirs(cp_dir)
    if os.getuid() == 0:
        shutil.chown(cp_dir, "postgres", "postgres")
    archive = f"cp %p {cp_dir}/%f && env {env_words} PGKEEP_LOG_LEVEL=warn {binary} archive-push %p"
    cluster = Cluster(work, conf=f"archive_mode = on\narchive_command = '{archive}'\nwal_level = replica\n")
    daemon = None
    try:
        cluster.pgbench("-i", "-s", "10", "-q")
        out = subprocess.run(as_pg([binary, "backup"], {**env, "PGHOST": "127.0.0.1", "PGPORT": str(cluster.port),
                                                        "PGUSER": "postgres"}), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"backup failed: {out.stderr}")
        start = lsn(cluster.sql("select pg_current_wal_lsn()"))
        while lsn(cluster.sql("select pg_current_wal_lsn()")) - start < args.wal_mb * MB:
            cluster.pgbench("-n", "-c", "4", "-j", "2", "-T", "5")
        cluster.sql("select pg_switch_wal()")
        for _ in range(3000):
            if cluster.sql("select count(*) from pg_ls_archive_statusdir() where name like '%.ready'") == "0":
                break
            time.sleep(0.1)
        handoff = os.path.join(work, "handoff")
        daemon = Daemon(binary, work, cluster, {**env, "PGKEEP_PREFETCH_DIR": handoff,
                                                 "PGKEEP_LOG_LEVEL": args.daemon_log})
        pristine = os.path.join(work, "pristine")
        os.makedirs(pristine)
        if os.getuid() == 0:
            shutil.chown(pristine, "postgres", "postgres")
        out = subprocess.run(as_pg([binary, "restore", "--target-dir", pristine], env), capture_output=True,
                             text=True, cwd="/")
        if out.returncode != 0:
            raise SystemExit(f"restore failed: {out.stderr}")
        # The daemon's token (in its spool by default): wal-fetch believes its answers only with it.
        token = os.path.join(work, "spool", "http-token")
        # The daemon streams the source's open segment too (a .partial in storage, which wal-fetch
        # serves under the segment's name), so recovery through pgkeep replays one file more than a
        # folder of archive_command copies holds: cp gets that same file, and all replay the same WAL.
        # Before each cp round, the segment after the last one in the folder is copied there from
        # storage as wal-fetch serves it (the streamed .partial), so that cp replays it too.
        open_env = {**env, "PGKEEP_LISTEN": f"127.0.0.1:{free_port()}", "PGKEEP_PGDATA": pristine,
                    "PGKEEP_LOG_LEVEL": "warn", "PGKEEP_PREFETCH_DIR": os.path.join(work, "absent", "none")}

        def open_segment_for_cp():
            last = max(f for f in os.listdir(cp_dir) if len(f) == 24 and not f.endswith("open"))
            seg = int(last[8:16], 16) * 256 + int(last[16:], 16) + 1
            name = f"{last[:8]}{seg // 256:08X}{seg % 256:08X}"
            subprocess.run(as_pg([binary, "wal-fetch", name, os.path.join(cp_dir, name)], open_env),
                           cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wal_fetch = f"{binary} wal-fetch %f %p"
        # wal-fetch alone: no daemon answers, so its first read from storage starts its own prefetch
        # (a helper process) into a directory of its own.
        alone = os.path.join(work, "alone-handoff")
        commands = {
            "cp": f"cp {cp_dir}/%f %p",
            "wal-fetch": f"env {env_words} PGKEEP_LISTEN=127.0.0.1:{free_port()} PGKEEP_PREFETCH_DIR={alone} "
                         f"{wal_fetch}",
            "daemon": f"env {env_words} PGKEEP_LISTEN=127.0.0.1:{daemon.http} PGKEEP_PREFETCH_DIR={handoff} "
                      f"PGKEEP_HTTP_TOKEN_FILE={token} {binary} wal-fetch %f %p",
        }
        times = {k: [] for k in commands}
        files = {}
        for r in range(args.rounds):
            for name, command in commands.items():
                if name == "cp":
                    open_segment_for_cp()
                took, restored, log = timed_recovery(work, pristine, name, command)
                times[name].append(took)
                files[name] = restored
                extra = ""
                if name != "cp":
                    handed = log.count('via="handoff"')
                    extra = f", {handed} handed off"
                print(f"round {r + 1}: {name:10} {took:6.2f} s ({restored} files{extra})", flush=True)
        base = statistics.median(times["cp"])
        print(f"== replay of {args.wal_mb} MB of pgbench WAL ({files['cp']} files), {args.storage} storage, "
              f"median of {args.rounds} rounds")
        for name in commands:
            m = statistics.median(times[name])
            print(f"{name:10} {m:6.2f} s  {m / base:5.2f}x cp")

        # One wal-fetch of a prefetched segment, timed as a whole process, against starting the binary.
        segs = sorted(f for f in os.listdir(cp_dir) if len(f) == 24)
        dest_dir = os.path.join(work, "fetched")
        os.makedirs(dest_dir)
        if os.getuid() == 0:
            shutil.chown(dest_dir, "postgres", "postgres")
        fetch_env = {**env, "PGKEEP_LISTEN": f"127.0.0.1:{daemon.http}", "PGKEEP_PREFETCH_DIR": handoff,
                     "PGKEEP_HTTP_TOKEN_FILE": token,
                     "PGKEEP_PGDATA": pristine, "PGKEEP_LOG_LEVEL": "warn"}
        hit, version, copy = [], [], []
        n = min(args.samples, len(segs) - 2)
        # The first request goes to the daemon and starts the prefetch.
        run_as_pg_timed([binary, "wal-fetch", segs[0], os.path.join(dest_dir, "first")], fetch_env)
        for i in range(1, n + 1):
            seg = segs[i]
            for _ in range(2000):
                if any(f.startswith(seg + ".") and not f.endswith("tmp") for f in os.listdir(handoff)):
                    break
                time.sleep(0.005)
            else:
                raise SystemExit(f"{seg} was not prefetched")
            hit.append(run_as_pg_timed([binary, "wal-fetch", seg, os.path.join(dest_dir, seg)], fetch_env))
            version.append(run_as_pg_timed([binary, "--version"], {}))
            os.remove(os.path.join(dest_dir, seg))
            copy.append(run_as_pg_timed(["cp", os.path.join(cp_dir, seg), os.path.join(dest_dir, seg)], {}))
            os.remove(os.path.join(dest_dir, seg))
        print(f"prefetched wal-fetch (whole process as postgres, {n} segments): p50 {pct(hit, 50):.1f} ms, p99 "
              f"{pct(hit, 99):.1f} ms; pgkeep --version: p50 {pct(version, 50):.1f} ms; cp of the segment: p50 "
              f"{pct(copy, 50):.1f} ms; wal-fetch - --version: p50 {pct(hit, 50) - pct(version, 50):.1f} ms")
    finally:
        if daemon:
            daemon.stop()
        cluster.stop()
        if s3:
            s3.stop()


if __name__ == "__main__":
    sys.exit(main())
