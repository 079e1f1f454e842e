{{/*
Names and labels come from these helpers only, so every resource carries the same set.
*/}}

{{- define "kvstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvstore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvstore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that never change for a component; used in selectors. Call with (dict "ctx" $ "component" "store"). */}}
{{- define "kvstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of a resource. Call with (dict "ctx" $ "component" "store"). */}}
{{- define "kvstore.labels" -}}
helm.sh/chart: {{ include "kvstore.chart" .ctx }}
{{ include "kvstore.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kvstore
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations from commonAnnotations plus extra ones. Call with (dict "ctx" $ "extra" dict). */}}
{{- define "kvstore.annotations" -}}
{{- $all := merge (deepCopy (default dict .extra)) (deepCopy .ctx.Values.commonAnnotations) -}}
{{- if $all }}
annotations:
  {{- toYaml $all | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "kvstore.headlessName" -}}
{{- printf "%s-headless" (include "kvstore.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvstore.redisName" -}}
{{- printf "%s-redis" (include "kvstore.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvstore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvstore.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s/%s@%s" .Values.image.registry .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "kvstore.redisImage" -}}
{{- $i := .Values.redis.internal.image -}}
{{- printf "%s/%s:%s" $i.registry $i.repository $i.tag -}}
{{- end -}}

{{/* The Redis URL the store uses when it comes from values (not from a Secret). */}}
{{- define "kvstore.redisUrl" -}}
{{- if .Values.redis.internal.enabled -}}
{{- printf "redis://%s:%d/0" (include "kvstore.redisName" .) (int .Values.redis.internal.port) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* What clients are given as KVSTORE_TARGET: the members of one keyspace (cluster.*), or the Service. */}}
{{- define "kvstore.clusterTarget" -}}
{{- if not .Values.cluster.enabled -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "kvstore.fullname" .) .Release.Namespace (int .Values.service.grpcPort) -}}
{{- else if eq .Values.cluster.membership "static" -}}
{{- join "," .Values.cluster.staticMembers -}}
{{- else -}}
{{- printf "dns:///%s.%s.svc.cluster.local:%d" (include "kvstore.headlessName" .) .Release.Namespace (int .Values.service.grpcPort) -}}
{{- end -}}
{{- end -}}

{{/* Owners per chunk (KVSTORE_REPLICATION): cluster.replication, capped at the members there will be. */}}
{{- define "kvstore.clusterReplication" -}}
{{- $members := int .Values.replicaCount -}}
{{- if .Values.autoscaling.enabled -}}{{- $members = int .Values.autoscaling.minReplicas -}}{{- end -}}
{{- if eq .Values.cluster.membership "static" -}}{{- $members = len .Values.cluster.staticMembers -}}{{- end -}}
{{- if not .Values.cluster.enabled -}}1{{- else -}}{{- max 1 (min (int .Values.cluster.replication) $members) -}}{{- end -}}
{{- end -}}

{{/* Whether the chart's own Secret has anything to hold. */}}
{{- define "kvstore.createSecret" -}}
{{- if or (and .Values.s3.enabled (not .Values.s3.existingSecret) .Values.s3.accessKeyId) (and .Values.auth.enabled (not .Values.auth.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{/*
The token the chart generates for auth.tenant (auth on, no existingSecret). On an upgrade it is read back
from the release's live Secret (lookup), so `helm upgrade` neither rotates it nor rolls the pods; on a first
install, and with `helm template` (no cluster to ask), it is 48 new random characters (~285 bits).
The token is drawn once per render and remembered in the render's values, so secret.yaml and the
StatefulSet's checksum of it (which renders secret.yaml a second time) see the same token: otherwise the
checksum of a first install would not match its Secret and the first upgrade would roll every pod.
*/}}
{{- define "kvstore.generatedToken" -}}
{{- if not (hasKey .Values.auth "_generatedToken") -}}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "kvstore.fullname" .) -}}
{{- $key := .Values.auth.existingSecretClientTokenKey -}}
{{- $token := randAlphaNum 48 -}}
{{- if and $live (hasKey ($live.data | default dict) $key) -}}
{{- $token = index $live.data $key | b64dec -}}
{{- end -}}
{{- $_ := set .Values.auth "_generatedToken" $token -}}
{{- end -}}
{{- index .Values.auth "_generatedToken" -}}
{{- end -}}

{{/* Name of the Secret holding S3 credentials, or "" when the pod uses ambient credentials (IRSA, instance role). */}}
{{- define "kvstore.s3SecretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else if .Values.s3.accessKeyId -}}
{{- include "kvstore.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret holding the token map and the clients' token, or "" with auth off. */}}
{{- define "kvstore.authSecretName" -}}
{{- if not .Values.auth.enabled -}}
{{- else if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else -}}
{{- include "kvstore.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* Fail early on combinations the server would reject at startup anyway. */}}
{{- define "kvstore.validate" -}}
{{- if and .Values.s3.enabled (not .Values.s3.existingSecret) (or .Values.s3.accessKeyId .Values.s3.secretAccessKey) (not (and .Values.s3.accessKeyId .Values.s3.secretAccessKey)) -}}
{{- fail "s3.accessKeyId and s3.secretAccessKey must be set together (or use s3.existingSecret)" -}}
{{- end -}}
{{- if and (not .Values.auth.enabled) (or .Values.auth.tokens .Values.auth.existingSecret) -}}
{{- fail "auth.enabled=false turns authentication off, yet auth.tokens or auth.existingSecret is set: remove them, or keep auth.enabled=true" -}}
{{- end -}}
{{- if and .Values.auth.tls.enabled (not .Values.auth.tls.existingSecret) -}}
{{- fail "auth.tls.enabled needs auth.tls.existingSecret (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.redis.internal.enabled (not .Values.redis.enabled) -}}
{{- fail "redis.internal.enabled runs a Redis for the Redis tier: set redis.enabled=true too" -}}
{{- end -}}
{{- if and .Values.cluster.enabled (eq .Values.cluster.membership "static") (not .Values.cluster.staticMembers) -}}
{{- fail "cluster.membership=static needs cluster.staticMembers (host:port of every store replica)" -}}
{{- end -}}
{{- if and .Values.redis.cluster .Values.redis.internal.enabled -}}
{{- fail "redis.cluster needs an external Redis Cluster: redis.internal runs a single Redis (set redis.url to a cluster node)" -}}
{{- end -}}
{{- if and .Values.redis.cluster (hasPrefix "unix://" .Values.redis.url) -}}
{{- fail "redis.cluster needs TCP nodes: redis.url must be redis:// or rediss://, not unix://" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- end -}}
