{{- define "pullgate.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pullgate.labels" -}}
app.kubernetes.io/name: pullgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pullgate.selector" -}}
app.kubernetes.io/name: pullgate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pullgate.secretName" -}}
{{- if .Values.existingSecret -}}{{ .Values.existingSecret }}{{- else -}}{{ include "pullgate.name" . }}{{- end -}}
{{- end -}}
