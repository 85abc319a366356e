{{/* The release's base name: the release name, or <release>-fanout when it lacks "fanout". */}}
{{- define "fanout.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The webhook's Deployment, Service and (by default) ServiceAccount. */}}
{{- define "fanout.webhook" -}}
{{- printf "%s-webhook" (include "fanout.fullname" .) -}}
{{- end -}}

{{- define "fanout.serviceAccount" -}}
{{- default (include "fanout.webhook" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Secret the webhook serves from. */}}
{{- define "fanout.certSecret" -}}
{{- if eq .Values.certs.mode "secret" -}}
{{- required "certs.secret.name is required with certs.mode=secret" .Values.certs.secret.name -}}
{{- else -}}
{{- printf "%s-certs" (include "fanout.webhook" .) -}}
{{- end -}}
{{- end -}}

{{- define "fanout.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "fanout.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fanout.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fanout
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fanout.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) -}}
{{- end -}}
