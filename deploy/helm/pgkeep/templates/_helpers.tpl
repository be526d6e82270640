{{/* The release's base name: <release>-pgkeep, or the release name when it already says pgkeep. */}}
{{- define "pgkeep.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else if contains "pgkeep" .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-pgkeep" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgkeep.selectorLabels" -}}
app.kubernetes.io/name: pgkeep
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pgkeep.labels" -}}
{{ include "pgkeep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret that holds the passwords (postgres-password, pgkeep-password). */}}
{{- define "pgkeep.secretName" -}}
{{- .Values.secret.existingSecret | default (include "pgkeep.fullname" .) -}}
{{- end -}}

{{/* The storage credentials' Secret (read and write), if there is one ("" otherwise). */}}
{{- define "pgkeep.storageSecretName" -}}
{{- if .Values.secret.existingStorageSecret -}}
{{- .Values.secret.existingStorageSecret -}}
{{- else if .Values.secret.env -}}
{{- printf "%s-storage" (include "pgkeep.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The read-only storage credentials' Secret, if there is one ("" otherwise). */}}
{{- define "pgkeep.readOnlySecretName" -}}
{{- if .Values.secret.existingReadOnlyStorageSecret -}}
{{- .Values.secret.existingReadOnlyStorageSecret -}}
{{- else if .Values.secret.readOnlyEnv -}}
{{- printf "%s-storage-readonly" (include "pgkeep.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "pgkeep.image" -}}
{{- printf "%s:%s%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) (include "pgkeep.digest" (list "image.digest" .Values.image.digest)) -}}
{{- end -}}

{{/* "@sha256:…" for a digest pin, checked; "" without one. */}}
{{- define "pgkeep.digest" -}}
{{- $key := index . 0 -}}{{- $d := index . 1 -}}
{{- if $d -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $d) -}}
{{- fail (printf "%s %q: expected sha256: and 64 lower-case hex digits" $key $d) -}}
{{- end -}}
{{- printf "@%s" $d -}}
{{- end -}}
{{- end -}}

{{/* The role pgkeep connects as, checked: it goes into pg_hba.conf and SQL. */}}
{{- define "pgkeep.pgkeepUser" -}}
{{- /* Not the superuser's name by default: `helm upgrade --reuse-values` from an earlier chart
       leaves the value empty. */ -}}
{{- $u := .Values.postgres.pgkeepUser | default "pgkeep" -}}
{{- if not (regexMatch "^[a-z_][a-z0-9_]{0,62}$" $u) -}}
{{- fail (printf "postgres.pgkeepUser %q: use lower-case letters, digits and _ (it is written into pg_hba.conf)" $u) -}}
{{- end -}}
{{- if or (has $u (list "all" "public" "none" "replication" "samerole" "samegroup" "sameuser" "current_user" "session_user")) (hasPrefix "pg_" $u) -}}
{{- fail (printf "postgres.pgkeepUser %q is a reserved name in pg_hba.conf or Postgres" $u) -}}
{{- end -}}
{{- $u -}}
{{- end -}}

{{/* The key of the passwords' Secret that holds the password of the role pgkeep connects as. */}}
{{- define "pgkeep.roleKey" -}}
{{- ternary "postgres-password" "pgkeep-password" (eq (include "pgkeep.pgkeepUser" .) .Values.postgres.user) -}}
{{- end -}}

{{/* A password of the release's Secret: the value given, else the one the Secret already holds
     (so an upgrade keeps it; an earlier chart's Secret held the superuser's as PGPASSWORD),
     else a new random one. */}}
{{- define "pgkeep.password" -}}
{{- $ctx := index . 0 -}}{{- $key := index . 1 -}}{{- $given := index . 2 -}}{{- $legacy := index . 3 -}}
{{- if $given -}}
{{- $given -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (include "pgkeep.fullname" $ctx) -}}
{{- if and $existing $existing.data (hasKey $existing.data $key) -}}
{{- index $existing.data $key | b64dec -}}
{{- else if and $legacy $existing $existing.data (hasKey $existing.data $legacy) -}}
{{- index $existing.data $legacy | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when the release's running Secret is an earlier chart's (the superuser's password as
     PGPASSWORD, no pgkeep role yet): the pre-upgrade Job then connects as the superuser, once. */}}
{{- define "pgkeep.legacySecret" -}}
{{- $sts := lookup "apps/v1" "StatefulSet" .Release.Namespace (include "pgkeep.fullname" .) -}}
{{- if $sts -}}
{{- $pg := dict -}}
{{- range $sts.spec.template.spec.containers -}}{{- if eq .name "postgres" -}}{{- $pg = . -}}{{- end -}}{{- end -}}
{{- $roled := false -}}
{{- range ($pg.env | default list) -}}{{- if eq .name "BACKUP_ROLE" -}}{{- $roled = true -}}{{- end -}}{{- end -}}
{{- if not $roled -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* An earlier chart kept the storage keys in the release's Secret: refuse an upgrade that would
     drop them silently. */}}
{{- define "pgkeep.checkLegacyStorageKeys" -}}
{{- if not (or .Values.secret.env .Values.secret.existingStorageSecret) -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "pgkeep.secretName" .) -}}
{{- if and $existing $existing.data -}}
{{- range $k, $v := $existing.data -}}
{{- if regexMatch "^(AWS|GOOGLE|AZURE)_" $k -}}
{{- fail (printf "the Secret %s holds %s, as an earlier chart kept the storage credentials: give them as secret.env (or name a Secret in secret.existingStorageSecret); this chart reads them from a Secret of their own" (include "pgkeep.secretName" $) $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The passwords' Secret data. */}}
{{- define "pgkeep.secretData" -}}
postgres-password: {{ include "pgkeep.password" (list . "postgres-password" .Values.secret.postgresPassword "PGPASSWORD") | b64enc | quote }}
pgkeep-password: {{ include "pgkeep.password" (list . "pgkeep-password" .Values.secret.pgkeepPassword "") | b64enc | quote }}
{{- end -}}

{{- define "pgkeep.envSecretData" -}}
{{- range $k, $v := . }}
{{- if not (regexMatch "^(AWS|GOOGLE|AZURE)_[A-Z0-9_]+$" $k) }}
{{- fail (printf "secret: %q is not a storage credential pgkeep reads (AWS_*, GOOGLE_* or AZURE_*)" $k) }}
{{- end }}
{{ $k }}: {{ $v | toString | b64enc | quote }}
{{- end }}
{{- end -}}

{{/* A projected volume of credential files for PGKEEP_CREDENTIALS_DIR: the storage Secret given
     (may be ""), and the pgkeep role's password as PGPASSWORD when withPassword. */}}
{{- define "pgkeep.credentialsVolume" -}}
{{- $ctx := index . 0 -}}{{- $name := index . 1 -}}{{- $storage := index . 2 -}}{{- $withPassword := index . 3 -}}
- name: {{ $name }}
  projected:
    defaultMode: 0440
    sources:
      {{- if $storage }}
      - secret: {name: {{ $storage }}}
      {{- end }}
      {{- if $withPassword }}
      - secret:
          name: {{ include "pgkeep.secretName" $ctx }}
          items:
            - {key: {{ include "pgkeep.roleKey" $ctx }}, path: PGPASSWORD}
      {{- end }}
{{- end -}}

{{/* "true" when storage is a cloud's (its credentials are needed to read it). */}}
{{- define "pgkeep.cloudStorage" -}}
{{- if not (hasPrefix "file://" .Values.storage.url) -}}true{{- end -}}
{{- end -}}

{{/* pgkeep.toml: the settings every container of the release reads (PGKEEP_CONFIG). */}}
{{- define "pgkeep.config" -}}
# pgkeep settings for release {{ .Release.Name }}; every key is described in docs/configuration.md.
# Credentials are not here: each container reads its own from files (PGKEEP_CREDENTIALS_DIR).
storage = {{ required "storage.url is required (s3://, gs://, az:// or file://)" .Values.storage.url | toJson }}
spool_dir = "/var/lib/pgkeep/spool"
# Prefetched WAL, where the daemon places it and restore_command (in the Postgres container) takes
# it without a request: a volume both containers mount.
prefetch_dir = "/var/lib/pgkeep/handoff/wal"
# The daemon's token, in a folder only the daemon and the Postgres container mount (wal-fetch and
# the preStop hook take the daemon's answers only with its proof of it).
http_token_file = "/var/run/pgkeep/http-token"
listen = {{ printf "%s:%d" .Values.daemon.listenAddress (int .Values.daemon.port) | toJson }}
pg = {{ printf "host=127.0.0.1 port=%d user=%s dbname=postgres" (int .Values.postgres.port) (include "pgkeep.pgkeepUser" .) | toJson }}
{{- if hasKey .Values.config "synchronous" }}
{{- fail "set synchronous mode through daemon.synchronous (it sets Postgres' side too), not config.synchronous" }}
{{- end }}
{{- if .Values.daemon.synchronous }}
synchronous = true
{{- end }}
{{- range $k, $v := .Values.config }}
{{ $k }} = {{ $v | toJson }}
{{- end }}
{{- with .Values.encryption.recipients }}
encryption_recipients = {{ . | toJson }}
{{- end }}
{{- end -}}

{{/* The identity Secret's volume mount and variable: only for the restore init container and the
     Postgres container (restore_command runs wal-fetch there). Never the sidecar or the hook Job. */}}
{{- define "pgkeep.identityMount" -}}
{{- if .Values.encryption.identitySecret }}
- {name: identity, mountPath: /etc/pgkeep-identity, readOnly: true}
{{- end }}
{{- end -}}
{{- define "pgkeep.identityEnv" -}}
{{- if .Values.encryption.identitySecret }}
- {name: PGKEEP_ENCRYPTION_IDENTITY_FILE, value: {{ printf "/etc/pgkeep-identity/%s" .Values.encryption.identitySecretKey | quote }}}
{{- end }}
{{- end -}}
{{- define "pgkeep.checkEncryption" -}}
{{- if or (hasKey .Values.config "encryption_recipients") (hasKey .Values.config "encryption_identity_file") -}}
{{- fail "set encryption through encryption.recipients and encryption.identitySecret, not config.encryption_*" -}}
{{- end -}}
{{- if and .Values.encryption.recipients (not .Values.encryption.identitySecret) -}}
{{- fail "encryption.recipients is set but encryption.identitySecret is not: the restore init container could not read the backups (create a Secret holding the identity file and name it here)" -}}
{{- end -}}
{{- range .Values.encryption.recipients -}}
{{- if not (hasPrefix "age1" .) -}}
{{- fail "encryption.recipients: each entry must be an age public key (age1…); never put a secret key (AGE-SECRET-KEY-…) in the chart's values" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Starts Postgres: initdb when the data directory holds no cluster (and initdb is allowed),
     then postgres with the given -c settings. SIGTERM is turned into a fast shutdown (SIGINT), so a
     pod stops within its grace period whatever the image's STOPSIGNAL. */}}
{{- define "pgkeep.startPostgres" -}}
#!/bin/sh
set -eu
: "${PGDATA:?PGDATA must be set}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ "${INITDB_IF_EMPTY:-false}" != true ]; then
    echo "start-postgres: $PGDATA holds no cluster, and this pod must not create one (a standby is restored from a backup: is there one in storage?)" >&2
    exit 1
  fi
  echo "start-postgres: $PGDATA holds no cluster and storage held no backup: creating a new cluster"
  # The superuser's password, from the Secret's file (never in the environment).
  initdb -D "$PGDATA" --username="${PGUSER:-postgres}" --pwfile="$AUTH_DIR/postgres-password" --auth-local=trust --auth-host=scram-sha-256 --data-checksums --encoding=UTF8
  # initdb's lines: local (trust, inside the container only) and loopback. Then: pgkeep's role
  # runs SQL over loopback (the sidecar) and, from elsewhere, in the postgres database only (the
  # hook Job's mark: it can run nothing there but pg_switch_wal and pg_create_restore_point), and
  # replicates from anywhere (the backup Job comes through the Service); every other role, any
  # database but replication, from anywhere. With
  # TLS on (HBA_TYPE=hostssl), connections from outside the pod must use it.
  hba="${HBA_TYPE:-host}"
  if [ -n "${BACKUP_ROLE:-}" ] && [ "$BACKUP_ROLE" != "${PGUSER:-postgres}" ]; then
    printf '%s\n' "host all $BACKUP_ROLE 127.0.0.1/32 scram-sha-256" "host all $BACKUP_ROLE ::1/128 scram-sha-256" \
      "$hba postgres $BACKUP_ROLE all scram-sha-256" \
      "host all $BACKUP_ROLE all reject" "host replication $BACKUP_ROLE 127.0.0.1/32 scram-sha-256" \
      "host replication $BACKUP_ROLE ::1/128 scram-sha-256" "$hba replication $BACKUP_ROLE all scram-sha-256" \
      "$hba all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  else
    printf '%s\n' "$hba all all all scram-sha-256" "$hba replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  fi
fi

# pgkeep's role (BACKUP_ROLE): created, or its password and rights set again, once the cluster
# runs as a primary (a standby has the primary's roles). Over the local socket as the superuser;
# the password comes from the Secret's file and is kept out of the server's log.
ensure_role() {
  role="${BACKUP_ROLE:-}"
  if [ -z "$role" ] || [ "$role" = "${PGUSER:-postgres}" ]; then return 0; fi
  # A standby stays in recovery: it has the primary's roles.
  if [ -f "$PGDATA/standby.signal" ]; then return 0; fi
  sock="-h /var/run/postgresql -p ${PGPORT:-5432} -U ${PGUSER:-postgres} -d postgres"
  pause=1
  until [ "$(psql -XtAq $sock -c 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep "$pause"
    [ "$pause" -ge 16 ] || pause=$((pause * 2))
  done
  if psql -Xq $sock -v ON_ERROR_STOP=1 -v role="$role" <<'SQL'
SET synchronous_commit = local;
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = 'panic';
SET password_encryption = 'scram-sha-256';
\set pw `cat "$AUTH_DIR/pgkeep-password"`
SELECT format('CREATE ROLE %I', :'role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD :'pw';
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO :"role";
GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO :"role";
SQL
  then
    echo "start-postgres: role $role ready for pgkeep (LOGIN REPLICATION, pg_switch_wal, pg_create_restore_point)"
  else
    echo "start-postgres: could not set up the role $role for pgkeep" >&2
  fi
}

postgres "$@" &
pid=$!
ensure_role &
trap 'kill -INT "$pid" 2>/dev/null || true' TERM INT
status=0
wait "$pid" || status=$?
if kill -0 "$pid" 2>/dev/null; then
  status=0
  wait "$pid" || status=$?
fi
exit "$status"
{{- end -}}

{{/* "true" when file:// storage lives on the chart's own archive volume. */}}
{{- define "pgkeep.archiveVolume" -}}
{{- if and .Values.storage.archiveVolume.enabled (hasPrefix "file://" .Values.storage.url) -}}true{{- end -}}
{{- end -}}

{{/* Environment every pgkeep process of the release gets (besides the Secret). */}}
{{- define "pgkeep.env" -}}
- {name: PGKEEP_CONFIG, value: /etc/pgkeep/pgkeep.toml}
{{- range $k, $v := .Values.storage.env }}
- {name: {{ $k }}, value: {{ $v | toString | quote }}}
{{- end }}
{{- end -}}

{{- define "pgkeep.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The sidecar: `pgkeep daemon`. A native sidecar (init container with restartPolicy: Always)
     or an ordinary container, as daemon.nativeSidecar says. */}}
{{- define "pgkeep.daemonContainer" -}}
- name: pgkeep
  image: {{ include "pgkeep.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["pgkeep", "daemon"]
  {{- if .Values.daemon.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  env:
    {{- include "pgkeep.env" . | nindent 4 }}
    - {name: PGKEEP_CREDENTIALS_DIR, value: /etc/pgkeep-credentials}
  ports:
    - name: http
      containerPort: {{ .Values.daemon.port }}
  startupProbe:
    httpGet: {path: /healthz, port: http}
    periodSeconds: 2
    failureThreshold: 30
  livenessProbe:
    httpGet: {path: /healthz, port: http}
    periodSeconds: 10
    failureThreshold: 6
  readinessProbe:
    httpGet: {path: /readyz, port: http}
    periodSeconds: 5
  resources:
    {{- toYaml .Values.daemon.resources | nindent 4 }}
  securityContext:
    {{- include "pgkeep.containerSecurity" . | nindent 4 }}
  volumeMounts:
    - {name: config, mountPath: /etc/pgkeep, readOnly: true}
    - {name: spool, mountPath: /var/lib/pgkeep/spool}
    - {name: pgkeep-token, mountPath: /var/run/pgkeep}
    - {name: wal-handoff, mountPath: /var/lib/pgkeep/handoff}
    - {name: credentials-pgkeep, mountPath: /etc/pgkeep-credentials, readOnly: true}
    - {name: tmp, mountPath: /tmp}
    {{- if include "pgkeep.archiveVolume" . }}
    - {name: archive, mountPath: /var/lib/pgkeep/archive}
    {{- end }}
{{- end }}

{{/* The Postgres image: the configured tag, else "<major>-bookworm"; a major pgkeep does not support is refused. */}}
{{- define "pgkeep.postgresImage" -}}
{{- $major := int .Values.postgres.major -}}
{{- if or (lt $major 13) (gt $major 18) -}}
{{- fail (printf "postgres.major %v is not supported: pgkeep supports Postgres 13 to 18" .Values.postgres.major) -}}
{{- end -}}
{{- printf "%s:%s%s" .Values.postgres.image.repository (.Values.postgres.image.tag | default (printf "%d-bookworm" $major)) (include "pgkeep.digest" (list "postgres.image.digest" .Values.postgres.image.digest)) -}}
{{- end -}}

{{/* TLS for Postgres (postgres.tls.secretName): where the Secret is mounted. */}}
{{- define "pgkeep.tlsDir" -}}/etc/postgres-tls{{- end -}}
