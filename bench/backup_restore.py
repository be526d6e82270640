#!/usr/bin/python3
"""Benchmark: pgkeep backup and restore beside pg_basebackup -Ft and a plain tar, on pgbench clusters.

For each scale it initialises a pgbench cluster, then measures, in one run on the same cluster:
  backup:  pgkeep backup (file:// storage, snappy)  |  pg_basebackup -Ft -X fetch (it fsyncs, as pgkeep does)  |  tar -cf of PGDATA
  restore: pgkeep restore                            |  tar -xf of pg_basebackup's base.tar (+ sync)
and pgkeep backup and restore encrypted with age (a key made by `pgkeep keygen`), with ratios
against the same pgkeep without encryption in the same run. --noise-mb adds a table of random
(incompressible) bytes so that encryption is measured on data compression cannot shrink.
Last, `pgkeep verify` over everything stored (with the identity: content decoded, the files the
chunks hold compared with each manifest), in MB/s of stored data checked, and a restore drill of
the newest backup (`verify --restore-drill`: restore, start, recover, promote, query, stop, remove)
with its steps' times.
and prints wall time, MB/s (of the database size, pg_wal excluded) and peak RSS, with ratios against
pg_basebackup (backup) and tar -xf followed by sync (restore: pgkeep restore syncs before it
reports success). Peak RSS across scales shows whether memory grows with the database.

Usage: bench/backup_restore.py [--scales 10,50] [--noise-mb 200] [--pgkeep target/release/pgkeep] [--workdir /tmp/pgkeep-bench]
Runs as root (clusters and pgkeep then run as the postgres user) or as a normal user.
"""
import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
ROOT = os.getuid() == 0


def as_pg(cmd, env=None):
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    if ROOT:
        return ["runuser", "-u", "postgres", "--", "env", *extra, *cmd]
    return ["env", *extra, *cmd]


def run(cmd, **kw):
    subprocess.run(cmd, check=True, **kw)


REPEAT = 1


def measure(cmd, cwd="/", prepare=None):
    """Runs cmd REPEAT times (after prepare()); returns the best (seconds, peak RSS in bytes)."""
    best = None
    for _ in range(REPEAT):
        if prepare:
            prepare()
        r = measure_once(cmd, cwd)
        best = r if best is None or r[0] < best[0] else (best[0], max(best[1], r[1]))
    return best


def measure_once(cmd, cwd):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.monotonic() - start
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return took, usage.ru_maxrss * 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dir_size(path, skip=()):
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def fresh_dir(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    if ROOT:
        shutil.chown(path, "postgres", "postgres")
    return path


def bench_scale(scale, pgkeep, work, noise_mb):
    work = fresh_dir(os.path.join(work, f"scale{scale}"))
    os.chmod(work, 0o755)
    data, archive = os.path.join(work, "data"), fresh_dir(os.path.join(work, "archive"))
    port = free_port()
    conf = os.path.join(work, "pgkeep.toml")
    with open(conf, "w") as f:
        f.write(f'storage = "file://{archive}"\n')
    bin_copy = os.path.join(work, "pgkeep")
    shutil.copy(pgkeep, bin_copy)
    os.chmod(bin_copy, 0o755)
    run(as_pg([f"{PGBIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]), stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n"
                f"archive_mode = on\narchive_command = '{bin_copy} --config {conf} archive-push %p'\n"
                "max_wal_size = '4GB'\n")
    run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-l", os.path.join(work, "pg.log"), "-w", "start"]), stdout=subprocess.DEVNULL)
    try:
        run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-i", "-s", str(scale), "-q", "postgres"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        psql = ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres", "-c"]
        if noise_mb:
            # 1 MiB rows of random bytes, stored uncompressed (pglz would give up on them anyway).
            run(psql + ["create table noise (b bytea); alter table noise alter column b set storage external"])
            run(psql + [f"insert into noise select (select decode(string_agg(md5(random()::text || s || g), ''), 'hex') "
                        f"from generate_series(1, 65536) s) from generate_series(1, {noise_mb}) g"])
        run(psql + ["checkpoint"])
        key = os.path.join(work, "age.key")
        made = subprocess.run([bin_copy, "keygen", "-o", key], check=True, capture_output=True, text=True)
        recipient = made.stderr.strip().removeprefix("Public key: ")
        if ROOT:
            shutil.chown(key, "postgres", "postgres")
        size = dir_size(data, skip=(os.path.join(data, "pg_wal"),))
        pgenv = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres"}
        rows = []

        t, rss = measure(as_pg([bin_copy, "--config", conf, "backup"], pgenv))
        rows.append(("backup", "pgkeep backup", t, rss))
        t, rss = measure(as_pg([bin_copy, "--config", conf, "backup"], {**pgenv, "PGKEEP_ENCRYPTION_RECIPIENTS": recipient}))
        rows.append(("backup", "pgkeep backup (age)", t, rss))
        # The same without compression: what the CPU spent on snappy, on this machine's cores.
        t, rss = measure(as_pg([bin_copy, "--config", conf, "backup"], {**pgenv, "PGKEEP_COMPRESSION": "none"}))
        rows.append(("backup", "pgkeep backup (none)", t, rss))
        bb = os.path.join(work, "basebackup")
        t, rss = measure(as_pg([f"{PGBIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                "-D", bb, "-Ft", "-X", "fetch", "-c", "fast", "--no-manifest"]),
                         prepare=lambda: fresh_dir(bb))
        rows.append(("backup", "pg_basebackup -Ft", t, rss))
        t, rss = measure(["tar", "-cf", os.path.join(work, "plain.tar"), "-C", data, "."])
        rows.append(("backup", "tar -cf PGDATA", t, rss))

        listing = json.loads(subprocess.run(as_pg([bin_copy, "--config", conf, "list", "--json"]), check=True,
                                            capture_output=True, text=True, cwd="/").stdout)
        plain_id = next(b["id"] for b in listing["backups"] if b["codec"] == "snappy" and not b.get("encrypted_to"))
        age_id = next(b["id"] for b in listing["backups"] if b.get("encrypted_to"))
        target = os.path.join(work, "restored")
        t, rss = measure(as_pg([bin_copy, "--config", conf, "restore", "--target-dir", target, "--backup", plain_id]),
                         prepare=lambda: fresh_dir(target))
        rows.append(("restore", "pgkeep restore", t, rss))
        t, rss = measure(as_pg([bin_copy, "--config", conf, "restore", "--target-dir", target, "--backup", age_id],
                               {"PGKEEP_ENCRYPTION_IDENTITY_FILE": key}),
                         prepare=lambda: fresh_dir(target))
        rows.append(("restore", "pgkeep restore (age)", t, rss))
        untar = os.path.join(work, "untarred")
        t, rss = measure(["tar", "-xf", os.path.join(bb, "base.tar"), "-C", untar], prepare=lambda: fresh_dir(untar))
        rows.append(("restore", "tar -xf base.tar", t, rss))
        # pgkeep restore syncs before it reports success; the honest baseline does too.
        t, rss = measure(["sh", "-c", f"tar -xf {os.path.join(bb, 'base.tar')} -C {untar} && sync -f {untar}"],
                         prepare=lambda: fresh_dir(untar))
        rows.append(("restore", "tar -xf + sync", t, rss))
        stored = next(b["stored_bytes"] for b in listing["backups"] if b["id"] == plain_id)
        # verify: every stored object of every backup above (and the WAL), with the identity.
        t, rss = measure(as_pg([bin_copy, "--config", conf, "verify"], {"PGKEEP_ENCRYPTION_IDENTITY_FILE": key}))
        rows.append(("verify", "pgkeep verify", t, rss))
        checked = json.loads(subprocess.run(as_pg([bin_copy, "--config", conf, "verify", "--json"],
                                                  {"PGKEEP_ENCRYPTION_IDENTITY_FILE": key}),
                                            capture_output=True, text=True, cwd="/").stdout)["stored_bytes_checked"]
        # A restore drill of the newest backup: restore, start, recover, promote, query, stop, remove.
        drill_dir = os.path.join(work, "drill")
        drill_cmd = as_pg([bin_copy, "--config", conf, "verify", "--restore-drill", drill_dir, "--json"],
                          {"PGKEEP_ENCRYPTION_IDENTITY_FILE": key, "PGKEEP_PG_BIN_DIR": PGBIN})
        t, rss = measure(drill_cmd)
        rows.append(("restore", "verify --restore-drill", t, rss))
        drill = json.loads(subprocess.run(drill_cmd, capture_output=True, text=True, cwd="/").stdout)
        if not drill["ok"]:
            sys.exit(f"the restore drill failed: {drill['error']}")
        steps = ", ".join(f"{s['name']} {s['seconds']:.2f}s" for s in drill["steps"])
        print(f"{scale:>5} drill steps: {steps}")
    finally:
        run(as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-m", "immediate", "stop"]), stdout=subprocess.DEVNULL)
    return size, stored, rows, checked


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="10,50")
    ap.add_argument("--pgkeep", default="target/release/pgkeep")
    ap.add_argument("--workdir", default="/tmp/pgkeep-bench")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each command; the fastest counts")
    ap.add_argument("--noise-mb", type=int, default=200, help="MiB of random bytes added to the database")
    args = ap.parse_args()
    global REPEAT
    REPEAT = args.repeat
    if not os.path.exists(args.pgkeep):
        run(["cargo", "build", "--release", "--bin", "pgkeep"])
    fresh_dir(args.workdir)
    os.chmod(args.workdir, 0o755)
    mb = 1024 * 1024
    print(f"{'scale':>5} {'db MB':>7} {'what':<22} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>11} {'time vs baseline':>17}")
    for scale in [int(s) for s in args.scales.split(",")]:
        size, stored, rows, checked = bench_scale(scale, os.path.abspath(args.pgkeep), args.workdir, args.noise_mb)
        base = {"backup": next(r[2] for r in rows if r[1] == "pg_basebackup -Ft"),
                "restore": next(r[2] for r in rows if r[1] == "tar -xf + sync"),
                "verify": next(r[2] for r in rows if r[1] == "pgkeep verify")}
        for kind, what, t, rss in rows:
            print(f"{scale:>5} {size / mb:>7.0f} {what:<22} {t:>8.2f} {size / mb / t:>8.0f} {rss / mb:>11.1f} {t / base[kind]:>16.2f}x")
        plain = {r[1]: r[2] for r in rows}
        print(f"{scale:>5} encryption: backup {plain['pgkeep backup (age)'] / plain['pgkeep backup']:.2f}x, "
              f"restore {plain['pgkeep restore (age)'] / plain['pgkeep restore']:.2f}x the time without (target <= 1.10x)")
        print(f"{scale:>5} verify checked {checked / mb:.0f} MB stored in {plain['pgkeep verify']:.2f} s: "
              f"{checked / mb / plain['pgkeep verify']:.0f} MB/s of stored data")
        print(f"{scale:>5} one pgkeep backup stored: {stored / mb:.0f} MB ({stored / size:.0%} of the database, snappy)")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
