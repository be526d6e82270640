#!/usr/bin/env bash
# pgkeep quickstart, on the embedded default (a local Postgres 15 and file:// storage):
#   1. starts a Postgres cluster whose archive_command is `pgkeep archive-push %p`,
#   2. writes data, takes a base backup with `pgkeep backup`, writes more,
#   3. destroys the cluster, and restores it with `pgkeep restore` into an empty directory: Postgres
#      then replays the archived WAL through `restore_command = pgkeep wal-fetch %f %p`,
#   4. checks that the restored cluster holds exactly the same rows, and shows what is in storage.
# Everything lives in $PGKEEP_QUICKSTART_DIR (default /tmp/pgkeep-quickstart); both clusters are
# stopped at the end (or on error). Runs as root (clusters then run as the postgres user) or not.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
WORK=${PGKEEP_QUICKSTART_DIR:-/tmp/pgkeep-quickstart}
say() { printf '\n==> %s\n' "$*"; }

[ -x "$PGBIN/initdb" ] || scripts/install-deps.sh postgres
say "building pgkeep"
cargo build --bin pgkeep
say "working in $WORK"
if [ -d "$WORK" ]; then
  for d in "$WORK/primary" "$WORK/restored"; do
    [ -f "$d/postmaster.pid" ] && { "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; }
  done
  rm -rf "$WORK"
fi
mkdir -p "$WORK"
cp target/debug/pgkeep "$WORK/pgkeep"   # the postgres user cannot read a checkout under /root
if [ "$(id -u)" = 0 ]; then
  chown -R postgres: "$WORK"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=$(free_port); P2=$(free_port)
cat > "$WORK/pgkeep.toml" <<TOML
# The embedded default: WAL archived to a directory on this machine.
storage = "file://$WORK/archive"
compression = "snappy"
TOML
chown --reference="$WORK" "$WORK/pgkeep.toml"
PGKEEP="$WORK/pgkeep --config $WORK/pgkeep.toml"
sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -p "$1" -d postgres -c "$2"; }
cleanup() {
  for d in "$WORK/primary" "$WORK/restored"; do
    [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT

say "initdb a primary cluster (port $P1) with archive_command = '$PGKEEP archive-push %p'"
as_pg "$PGBIN/initdb" -D "$WORK/primary" -A trust -U postgres --no-sync >/dev/null
cat >> "$WORK/primary/postgresql.conf" <<CONF
port = $P1
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
archive_mode = on
archive_command = '$PGKEEP archive-push %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w start >/dev/null

say "writing 20000 rows, then a base backup: $PGKEEP backup"
sql "$P1" "create table orders (id bigserial primary key, item text, at timestamptz default now())"
sql "$P1" "insert into orders (item) select 'before-backup-' || g from generate_series(1, 20000) g"
as_pg env PGHOST=127.0.0.1 PGPORT="$P1" PGUSER=postgres $PGKEEP backup
$PGKEEP list

say "writing 20000 more rows after the backup; they exist only in the archived WAL"
sql "$P1" "insert into orders (item) select 'after-backup-' || g from generate_series(1, 20000) g"
LAST=$(sql "$P1" "select pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 600); do
  DONE=$(sql "$P1" "select coalesce(last_archived_wal, '') >= '$LAST' from pg_stat_archiver")
  [ "$DONE" = t ] && break
  sleep 0.1
done
[ "$DONE" = t ] || { echo "WAL $LAST was not archived; see $WORK/primary.log" >&2; exit 1; }
EXPECTED=$(sql "$P1" "select count(*) || ' rows, md5 ' || md5(string_agg(o::text, '|' order by id)) from orders o")
echo "primary: $EXPECTED; archived up to $LAST"
say "destroying the primary (stop, delete its data directory)"
as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -m fast -w stop >/dev/null
rm -rf "$WORK/primary"

say "restoring into an empty directory: $PGKEEP restore --target-dir $WORK/restored"
as_pg mkdir "$WORK/restored"
as_pg $PGKEEP restore --target-dir "$WORK/restored"
"$PGBIN/pg_verifybackup" "$WORK/restored"
echo "what restore appended to postgresql.auto.conf:"; grep -A3 'pgkeep restore' "$WORK/restored/postgresql.auto.conf"
cat >> "$WORK/restored/postgresql.conf" <<CONF
port = $P2
archive_mode = off
CONF
say "starting the restored cluster (port $P2); it replays the archived WAL through pgkeep wal-fetch"
as_pg "$PGBIN/pg_ctl" -D "$WORK/restored" -l "$WORK/restored.log" -w start >/dev/null
for _ in $(seq 1 1200); do
  [ "$(sql "$P2" "select pg_is_in_recovery()" 2>/dev/null || true)" = f ] && break
  sleep 0.1
done
GOT=$(sql "$P2" "select count(*) || ' rows, md5 ' || md5(string_agg(o::text, '|' order by id)) from orders o")
echo "restored: $GOT"
echo "replayed $(grep -c 'restored log file' "$WORK/restored.log") WAL files from the archive through pgkeep"

say "what is in storage ($WORK/archive)"
(cd "$WORK/archive" && find . -type f | sort | sed 's|^\./|  |')

if [ "$GOT" = "$EXPECTED" ]; then
  say "OK: the restored cluster holds every row, including the 20000 written after the base backup"
  $PGKEEP list
else
  say "MISMATCH: expected $EXPECTED" >&2
  exit 1
fi
echo "Logs: $WORK/primary.log, $WORK/restored.log. Try: $WORK/pgkeep --config $WORK/pgkeep.toml wal-fetch $LAST /tmp/$LAST"
