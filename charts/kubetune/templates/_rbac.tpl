{{/*
What the operator does in a namespace where FineTuneJobs run. Kept equal to the API requests the
operator tests record (tests/test_chart_rbac.py fails on a missing or an unused grant). No Secrets:
trainer pods get S3 credentials by secretKeyRef, which the kubelet resolves, not the operator.
*/}}
{{- define "kubetune.namespacedRules" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if and .Values.operator.peering.enabled (eq .Values.rbac.scope "namespaced") }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}

{{/* Cluster-scoped reads of the framework (kopf): which CRDs and namespaces exist. */}}
{{- define "kubetune.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if eq .Values.rbac.scope "cluster" }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- if .Values.operator.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
{{- end -}}
