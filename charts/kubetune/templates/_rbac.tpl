{{/*
What the operator does in a namespace where FineTuneJobs run. Kept equal to the API requests the
operator tests record (tests/test_chart_rbac.py fails on a missing or an unused grant). No Secrets:
trainer pods get S3 credentials by secretKeyRef, which the kubelet resolves, not the operator.
*/}}
{{- define "kubetune.namespacedRules" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [list, watch, create, delete]  # watched (kopf); delete after ttlSecondsAfterFinished; a sweep's trials
- apiGroups: [kubetune.io]
  resources: [finetunesweeps]
  verbs: [list, watch]  # watched (kopf): each trial is a FineTuneJob the sweep owns
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, finetunesweeps/status]
  verbs: [patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers, finetunesweeps/finalizers]
  verbs: [update]  # children block their owner's foreground deletion: OwnerReferencesPermissionEnforcement checks this
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]  # a Job per gang attempt; patch: suspend; delete: old attempts
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [create, get]  # create-if-missing; on 409, get: is it this job's (owner uid) or a deleted one's?
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]  # the pods it labelled: their changes start a pass
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]  # list: the Job controller's FailedCreate events say why a Job has no pods
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get]  # trainer pods name the chart's trainer account where it exists, else the namespace's default
{{- if .Values.kueue.enabled }}
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]  # runPolicy.suspend of a queued job: its Workload's spec.active
{{- end }}
- apiGroups: [serving.kserve.io]
  resources: [inferenceservices]
  verbs: [create, get]  # spec.deploy.kserve, once a job has Succeeded; get: follow it until it has a URL
{{- end -}}

{{/* Cluster-scoped reads of the framework (kopf): which CRDs exist; in namespaced mode, which namespaces. */}}
{{- define "kubetune.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if eq .Values.rbac.scope "namespaced" }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end -}}
