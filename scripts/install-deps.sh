#!/usr/bin/env bash
# Installs what pgkeep's quickstart and tests need, when it is missing:
#   postgres  PostgreSQL 15 server and client (Debian packages)
#   s3s-fs    the S3-compatible test server (crates.io; about 3 minutes to build)
#   azurite   the Azure Blob emulator (npm, into target/azurite), for the storage conformance tests
#   helm      a Python environment (target/pyenv) with helm-python-sdk (Helm's engine: renders and
#             lints the chart offline), kubernetes-validate and PyYAML (PyPI), for the chart tests
# Usage: scripts/install-deps.sh [postgres] [s3s-fs] [azurite] [helm]
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
S3S_FS_VERSION=0.14.1   # newer versions need a newer rustc than this machine's
AZURITE_VERSION=3.35.0

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
    *) echo "unknown dependency: $what" >&2; exit 2 ;;
  esac
done
