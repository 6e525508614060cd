{{/* Namespace every object goes to: namespace.name when the chart creates it, else the release's. */}}
{{- define "unisd.namespace" -}}
{{- if and .Values.namespace.create .Values.namespace.name -}}
{{- .Values.namespace.name -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "unisd.prefix" -}}
{{- .Values.namePrefix | default "unisd" | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* unisd image for a kind (train, rollout, sandbox); same scheme as unisd.images.image(). */}}
{{- define "unisd.image" -}}
{{- $root := index . 0 -}}
{{- $kind := index . 1 -}}
{{- printf "%s/unisd-%s:%s" (trimSuffix "/" $root.Values.image.registry) $kind ($root.Values.image.tag | default $root.Chart.AppVersion) -}}
{{- end -}}

{{- define "unisd.labels" -}}
app.kubernetes.io/part-of: unisd
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "unisd.mlflow.selectorLabels" -}}
app.kubernetes.io/name: mlflow
app.kubernetes.io/instance: {{ include "unisd.prefix" . }}-mlflow
{{- end -}}

{{/* Pod-level security context meeting Pod Security "restricted". */}}
{{- define "unisd.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context meeting Pod Security "restricted", read-only root. */}}
{{- define "unisd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "unisd.mlflow.host" -}}
{{- printf "%s-mlflow.%s.svc.cluster.local" (include "unisd.prefix" .) (include "unisd.namespace" .) -}}
{{- end -}}

{{/* Host headers MLflow accepts: the Service in every DNS form (with and without port), localhost. */}}
{{- define "unisd.mlflow.allowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "unisd.prefix" .) -}}
{{- $ns := include "unisd.namespace" . -}}
{{- $port := int .Values.mlflow.port -}}
{{- $hosts := list -}}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) -}}
{{- $hosts = append $hosts . -}}
{{- $hosts = append $hosts (printf "%s:%d" . $port) -}}
{{- end -}}
{{- $hosts = concat $hosts (list "localhost:*" "127.0.0.1:*") .Values.mlflow.extraAllowedHosts -}}
{{- join "," $hosts -}}
{{- end -}}

{{/* The ClusterTrainingRuntime multi-node train steps use (cluster-scoped: prefixed to stay unique). */}}
{{- define "unisd.trainerRuntime" -}}
{{- printf "%s-torch-distributed" (include "unisd.prefix" .) -}}
{{- end -}}
