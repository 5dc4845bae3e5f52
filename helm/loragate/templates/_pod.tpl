{{/*
Pod pieces of the engine StatefulSet and the router Deployment. "loragate.podCommon" and
"loragate.podAnnotations" take (dict "ctx" $ "component" "engine" | "router"); the others take $.
*/}}

{{/*
Environment from Secrets. Engines authenticate callers (the router passes the Authorization
header through) and read the S3 store; a router keeping rate limits needs the keys to know
whose requests it counts ("loragate.authEnv" alone).
*/}}
{{- define "loragate.secretEnv" -}}
{{ include "loragate.authEnv" . }}
{{ include "loragate.s3Env" . }}
{{- end -}}

{{- define "loragate.authEnv" -}}
{{- if .Values.auth.enabled }}
{{- if include "loragate.apiKeysKey" . }}
- name: LORAGATE_API_KEYS_FILE
  value: /etc/loragate/auth/api-keys
{{- end }}
{{- with include "loragate.adminKeyKey" . }}
- name: LORAGATE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.authSecretName" $ }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- /* The router's rate-limit Redis URL from a Secret (rateLimits.redis.existingSecret). */}}
{{- define "loragate.redisEnv" -}}
{{- with .Values.rateLimits.redis }}
{{- if .existingSecret }}
- name: LORAGATE_RATE_LIMIT_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .existingSecretKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "loragate.s3Env" -}}
{{- if and (eq .Values.adapterStore.type "s3") (include "loragate.hasS3Credentials" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.s3SecretName" . }}
      key: {{ include "loragate.s3AccessKeyIdKey" . }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "loragate.s3SecretName" . }}
      key: {{ include "loragate.s3SecretAccessKeyKey" . }}
{{- end }}
{{- end -}}

{{/* The keys file, mounted from the Secret: the server reads a file, not a variable. */}}
{{- define "loragate.authVolume" -}}
{{- if and .Values.auth.enabled (include "loragate.apiKeysKey" .) }}
- name: auth
  secret:
    secretName: {{ include "loragate.authSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "loragate.apiKeysKey" . }}
        path: api-keys
{{- end }}
{{- end -}}

{{- define "loragate.authVolumeMount" -}}
{{- if and .Values.auth.enabled (include "loragate.apiKeysKey" .) }}
- name: auth
  mountPath: /etc/loragate/auth
  readOnly: true
{{- end }}
{{- end -}}

{{- define "loragate.podCommon" -}}
{{- $values := index .ctx.Values .component -}}
serviceAccountName: {{ include "loragate.serviceAccountName" .ctx }}
automountServiceAccountToken: {{ .ctx.Values.serviceAccount.automountServiceAccountToken }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Annotations that roll the pods when their configuration changes. Not auth.apiKeys: the
servers read the mounted keys file again while they run, so adding or revoking a key restarts
nothing (the admin key is a variable: changing it does). */}}
{{- define "loragate.podAnnotations" -}}
{{- $values := index .ctx.Values .component -}}
{{- $auth := omit .ctx.Values.auth "apiKeys" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
{{- if eq .component "engine" }}
checksum/secrets: {{ toJson (list $auth .ctx.Values.adapterStore.s3) | sha256sum }}
{{- else if include "loragate.rateLimited" .ctx }}
checksum/secrets: {{ toJson $auth | sha256sum }}
{{- end }}
{{- with $values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
