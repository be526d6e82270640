#!/usr/bin/env bash
# Installs what pgkeep's quickstart and tests need, when it is missing:
#   postgres  PostgreSQL 15 server and client (Debian packages)
#   s3s-fs    the S3-compatible test server (crates.io; about 3 minutes to build)
# Usage: scripts/install-deps.sh [postgres] [s3s-fs]
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
S3S_FS_VERSION=0.14.1   # newer versions need a newer rustc than this machine's

for what in "$@"; do
  case "$what" in
    postgres)
      if [ ! -x "$PGBIN/initdb" ] || ! command -v psql >/dev/null; then
        echo "installing PostgreSQL 15 (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
      fi
      ;;
    s3s-fs)
      export PATH="$HOME/.cargo/bin:$PATH"
      if ! command -v s3s-fs >/dev/null || ! s3s-fs --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
        echo "installing s3s-fs $S3S_FS_VERSION (cargo install; a few minutes)"
        cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --quiet
      fi
      ;;
    *) echo "unknown dependency: $what" >&2; exit 2 ;;
  esac
done
