{{/* Names, labels and the pieces shared by several templates. */}}

{{- define "backfill-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "backfill-operator.fullname" -}}
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

{{- define "backfill-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "backfill-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "backfill-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "backfill-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: backfill-operator
{{- end -}}

{{- define "backfill-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "backfill-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "backfill-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "backfill-operator.workerImage" -}}
{{- $repository := default .Values.image.repository .Values.worker.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tag -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* Namespaces that get the worker ServiceAccount + Role, as a list. */}}
{{- define "backfill-operator.workerNamespaces" -}}
{{- $namespaces := .Values.worker.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $namespaces) -}}
{{- end -}}

{{/*
RBAC rules: exactly those declared in backfill_operator/rbac.py (OPERATOR_RULES,
OPERATOR_CLUSTER_RULES, WORKER_RULES); tests/test_chart.py checks they stay equal.
*/}}

{{/* What the operator may do where it manages Backfills. */}}
{{- define "backfill-operator.operatorRules" -}}
- apiGroups: [backfill.dev]
  resources: [backfills]
  verbs: [get, list, watch, patch]
- apiGroups: [backfill.dev]
  resources: [backfills/status]
  verbs: [get, patch, update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
{{- end -}}

{{/* Cluster-wide mode only: kopf scans namespaces and CRDs. */}}
{{- define "backfill-operator.discoveryRules" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{/* What a worker pod may do in its own namespace: read its Backfill, report progress. */}}
{{- define "backfill-operator.workerRules" -}}
- apiGroups: [backfill.dev]
  resources: [backfills]
  verbs: [get, list, watch]
- apiGroups: [backfill.dev]
  resources: [backfills/status]
  verbs: [get, patch]
{{- end -}}
