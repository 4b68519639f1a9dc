{{/* Labels every object carries. */}}
{{- define "trellis.labels" -}}
app.kubernetes.io/part-of: trellis
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The one image every role runs. */}}
{{- define "trellis.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The controller's in-cluster address, as agents dial it and its certificate names it. */}}
{{- define "trellis.controllerHost" -}}
trellis-controller.{{ .Release.Namespace }}.svc
{{- end -}}
