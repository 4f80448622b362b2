{{/* Names, labels and derived settings shared by the templates. */}}
{{- define "lossd.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lossd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lossd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lossd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lossd.labels" -}}
{{ include "lossd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lossd
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "lossd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lossd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lossd.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "lossd.device" -}}
{{- default (ternary "cuda" "cpu" .Values.gpu.enabled) .Values.device -}}
{{- end -}}

{{/* grpc | https | exec, from probes.mode and the TLS settings. */}}
{{- define "lossd.probeMode" -}}
{{- if ne .Values.probes.mode "auto" -}}
{{- .Values.probes.mode -}}
{{- else if not .Values.tls.enabled -}}
grpc
{{- else if .Values.tls.clientCA.enabled -}}
exec
{{- else -}}
https
{{- end -}}
{{- end -}}

{{- define "lossd.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown -}}
{{- add $s.preStopSleepSeconds $s.drainSeconds $s.graceSeconds $s.marginSeconds -}}
{{- end -}}

{{/* One probe of the chosen mode; `path` is the gateway route for https. */}}
{{- define "lossd.probe" -}}
{{- $root := .root -}}
{{- $mode := include "lossd.probeMode" $root -}}
{{- if eq $mode "grpc" }}
grpc:
  port: {{ $root.Values.service.grpcPort }}
{{- else if eq $mode "https" }}
httpGet:
  path: {{ .path }}
  port: http
  scheme: HTTPS
{{- else if eq $mode "exec" }}
exec:
  command: ["python", "/usr/local/lib/lossd-docker/healthcheck.py"]
{{- else }}
{{- fail (printf "probes.mode must be auto, grpc, https or exec, not %q" $root.Values.probes.mode) }}
{{- end }}
{{- toYaml .settings | nindent 0 }}
{{- end -}}
