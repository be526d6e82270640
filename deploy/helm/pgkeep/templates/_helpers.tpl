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

{{/* The Secret that holds PGPASSWORD and the storage credentials (one env var per key). */}}
{{- define "pgkeep.secretName" -}}
{{- .Values.secret.existingSecret | default (include "pgkeep.fullname" .) -}}
{{- end -}}

{{- define "pgkeep.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Postgres password: the value given, else the one the release's Secret already holds
     (so an upgrade keeps it), else a new random one. */}}
{{- define "pgkeep.postgresPassword" -}}
{{- if .Values.secret.postgresPassword -}}
{{- .Values.secret.postgresPassword -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "pgkeep.fullname" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "PGPASSWORD") -}}
{{- index $existing.data "PGPASSWORD" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Secret data: PGPASSWORD and the storage credentials (secret.env). */}}
{{- define "pgkeep.secretData" -}}
PGPASSWORD: {{ include "pgkeep.postgresPassword" . | b64enc | quote }}
{{ include "pgkeep.storageSecretData" . }}
{{- end -}}

{{- define "pgkeep.storageSecretData" -}}
{{- range $k, $v := .Values.secret.env }}
{{ $k }}: {{ $v | toString | b64enc | quote }}
{{- end }}
{{- end -}}

{{/* pgkeep.toml: the settings every container of the release reads (PGKEEP_CONFIG). */}}
{{- define "pgkeep.config" -}}
# pgkeep settings for release {{ .Release.Name }}; every key is described in docs/configuration.md.
# Credentials are not here: they come from the Secret as environment variables.
storage = {{ required "storage.url is required (s3://, gs://, az:// or file://)" .Values.storage.url | toJson }}
spool_dir = "/var/lib/pgkeep/spool"
# The daemon's token, in a folder only the daemon and the Postgres container mount (wal-fetch and
# the preStop hook take the daemon's answers only with its proof of it).
http_token_file = "/var/run/pgkeep/http-token"
listen = {{ printf "%s:%d" .Values.daemon.listenAddress (int .Values.daemon.port) | toJson }}
pg = {{ printf "host=127.0.0.1 port=%d user=%s dbname=postgres" (int .Values.postgres.port) .Values.postgres.user | toJson }}
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
  pwfile="$PGDATA.pw"
  (umask 077; printf '%s' "${PGPASSWORD:?PGPASSWORD must be set}" > "$pwfile")
  # The password file goes whether initdb succeeds or not: no secret stays on the volume.
  status=0
  initdb -D "$PGDATA" --username="${PGUSER:-postgres}" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 --data-checksums --encoding=UTF8 || status=$?
  rm -f "$pwfile"
  [ "$status" = 0 ] || exit "$status"
  # With TLS on (HBA_TYPE=hostssl), connections from outside the pod must use it.
  hba="${HBA_TYPE:-host}"
  printf '%s\n' "$hba all all all scram-sha-256" "$hba replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
postgres "$@" &
pid=$!
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
  envFrom:
    - secretRef:
        name: {{ include "pgkeep.secretName" . }}
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
{{- printf "%s:%s" .Values.postgres.image.repository (.Values.postgres.image.tag | default (printf "%d-bookworm" $major)) -}}
{{- end -}}

{{/* TLS for Postgres (postgres.tls.secretName): where the Secret is mounted. */}}
{{- define "pgkeep.tlsDir" -}}/etc/postgres-tls{{- end -}}
