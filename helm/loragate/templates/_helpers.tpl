{{/*
Names. The full name is cut to 40 characters so that the longest derived name,
"<fullname>-engine-headless", and the StatefulSet's pod and revision names stay valid
63-character DNS labels.
*/}}
{{- define "loragate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "loragate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loragate.engineName" -}}{{ include "loragate.fullname" . }}-engine{{- end -}}
{{- define "loragate.engineHeadlessName" -}}{{ include "loragate.fullname" . }}-engine-headless{{- end -}}
{{- define "loragate.routerName" -}}{{ include "loragate.fullname" . }}-router{{- end -}}
{{- define "loragate.dataClaimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "loragate.fullname" .)) -}}
{{- end -}}

{{/* The port every container listens on (LORAGATE_PORT) and its probes use. */}}
{{- define "loragate.containerPort" -}}8000{{- end -}}

{{/* LORAGATE_HOME inside the containers: the data volume's mount point. */}}
{{- define "loragate.home" -}}/var/lib/loragate{{- end -}}

{{/* What the router resolves: every ready engine pod is an A/AAAA record of the headless Service. */}}
{{- define "loragate.engineDNS" -}}
{{- printf "%s.%s.svc.%s:%s" (include "loragate.engineHeadlessName" .) .Release.Namespace .Values.clusterDomain (include "loragate.containerPort" .) -}}
{{- end -}}

{{/* The base model's name in the API: the first of servedName's comma-separated names (the
others are aliases), else the model directory's last path element. */}}
{{- define "loragate.servedModel" -}}
{{- (splitList "," .Values.model.servedName | first | trim) | default (base .Values.model.name) -}}
{{- end -}}

{{- define "loragate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loragate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loragate.labels" -}}
helm.sh/chart: {{ include "loragate.chart" . }}
{{ include "loragate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels per component; call with (dict "ctx" $ "component" "engine"). */}}
{{- define "loragate.componentSelectorLabels" -}}
{{ include "loragate.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loragate.componentLabels" -}}
{{ include "loragate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loragate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "loragate.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "loragate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Secrets: the chart's own unless an existing one is named. */}}
{{- define "loragate.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "loragate.fullname" .)) -}}
{{- end -}}

{{- define "loragate.s3SecretName" -}}
{{- .Values.adapterStore.s3.existingSecret | default (printf "%s-s3" (include "loragate.fullname" .)) -}}
{{- end -}}

{{/* Key names inside those Secrets: fixed in the chart's own, chosen for an existing one ("" = absent). */}}
{{- define "loragate.apiKeysKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKeys.apiKeys }}{{- else -}}api-keys{{- end -}}
{{- end -}}

{{- define "loragate.adminKeyKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKeys.adminKey }}{{- else -}}admin-key{{- end -}}
{{- end -}}

{{- define "loragate.s3AccessKeyIdKey" -}}
{{- if .Values.adapterStore.s3.existingSecret -}}{{ .Values.adapterStore.s3.existingSecretKeys.accessKeyId }}{{- else -}}AWS_ACCESS_KEY_ID{{- end -}}
{{- end -}}

{{- define "loragate.s3SecretAccessKeyKey" -}}
{{- if .Values.adapterStore.s3.existingSecret -}}{{ .Values.adapterStore.s3.existingSecretKeys.secretAccessKey }}{{- else -}}AWS_SECRET_ACCESS_KEY{{- end -}}
{{- end -}}

{{- define "loragate.hasS3Credentials" -}}
{{- if or .Values.adapterStore.s3.existingSecret .Values.adapterStore.s3.accessKeyId -}}true{{- end -}}
{{- end -}}

{{/*
The admin key when none is given: generated on first install, then read back from the
release's Secret so an upgrade does not change it (offline rendering has no cluster to read,
so `helm template` prints a fresh one each time).
*/}}
{{- define "loragate.adminKey" -}}
{{- if .Values.auth.adminKey -}}
{{- .Values.auth.adminKey -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "loragate.authSecretName" .) | default dict -}}
{{- $previous := dig "data" "admin-key" "" $existing -}}
{{- if $previous -}}
{{- $previous | b64dec -}}
{{- else -}}
{{- printf "lg-admin-%s" (randAlphaNum 40) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The most engines that can run at once: what shared storage has to allow. */}}
{{- define "loragate.maxEngines" -}}
{{- if .Values.engine.autoscaling.enabled -}}{{ .Values.engine.autoscaling.maxReplicas }}{{- else -}}{{ .Values.engine.replicas }}{{- end -}}
{{- end -}}

{{/*
Combinations the schema cannot express; rendering stops with a message that says what to
change. Included once, from the ConfigMap template.
*/}}
{{- define "loragate.validate" -}}
{{- $maxEngines := include "loragate.maxEngines" . | int -}}
{{- if and (eq .Values.adapterStore.type "local") (not .Values.persistence.enabled) -}}
{{- fail "adapterStore.type=local keeps adapters on the data volume: set persistence.enabled=true (or use adapterStore.type=s3)" -}}
{{- end -}}
{{- if and .Values.persistence.enabled (not .Values.persistence.existingClaim) (gt $maxEngines 1) (not (has "ReadWriteMany" .Values.persistence.accessModes)) -}}
{{- fail (printf "up to %d engines share one data volume: add ReadWriteMany to persistence.accessModes (and use a StorageClass that supports it), or use adapterStore.type=s3 with persistence.enabled=false" $maxEngines) -}}
{{- end -}}
{{- if and .Values.auth.enabled .Values.auth.existingSecret (not .Values.auth.existingSecretKeys.apiKeys) (not .Values.auth.existingSecretKeys.adminKey) -}}
{{- fail "auth.existingSecretKeys names neither an apiKeys nor an adminKey key: name at least one, or set auth.enabled=false for an open server" -}}
{{- end -}}
{{- if and (eq .Values.adapterStore.type "s3") .Values.adapterStore.s3.existingSecret (not (and .Values.adapterStore.s3.existingSecretKeys.accessKeyId .Values.adapterStore.s3.existingSecretKeys.secretAccessKey)) -}}
{{- fail "adapterStore.s3.existingSecretKeys must name both the accessKeyId and the secretAccessKey keys of adapterStore.s3.existingSecret" -}}
{{- end -}}
{{- range $component := list "engine" "router" -}}
{{- $values := index $.Values $component -}}
{{- $scaling := $values.autoscaling -}}
{{- if and $scaling.enabled (gt (int $scaling.minReplicas) (int $scaling.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is above maxReplicas (%d)" $component (int $scaling.minReplicas) (int $scaling.maxReplicas)) -}}
{{- end -}}
{{- if ge (int $values.preStopSleepSeconds) (int $values.terminationGracePeriodSeconds) -}}
{{- fail (printf "%s.preStopSleepSeconds (%d) must be below terminationGracePeriodSeconds (%d): the server needs the rest to finish its open requests" $component (int $values.preStopSleepSeconds) (int $values.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Shutdown without refused connections: Kubernetes removes a terminating pod from its Services
while it runs preStop, so the pod keeps serving during the sleep; SIGTERM follows, and the
server stops accepting and finishes its open requests (streams included) before it exits.
Call with the component's values.
*/}}
{{- define "loragate.lifecycle" -}}
{{- if .preStopSleepSeconds }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ .preStopSleepSeconds }}"]
{{- end }}
{{- end -}}

{{/* An HTTP probe on the container port; call with (dict "probe" .Values.x.livenessProbe "path" "/healthz"). */}}
{{- define "loragate.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* A writable /tmp under the read-only root filesystem, for both components. */}}
{{- define "loragate.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Rate limits are kept by the router, for the whole fleet (gateway/router_limits.py); tenants'
own (rateLimits.tenants) are a ConfigMap mounted into the router. "true" when any is set. */}}
{{- define "loragate.rateLimited" -}}
{{- with .Values.rateLimits }}{{ if or .requestsPerMinute .tokensPerMinute .tenants }}true{{ end }}{{ end -}}
{{- end -}}
{{- define "loragate.rateLimitsDir" -}}/etc/loragate/rate-limits{{- end -}}
{{- define "loragate.rateLimitsFile" -}}{{ include "loragate.rateLimitsDir" . }}/tenant-rate-limits.json{{- end -}}
