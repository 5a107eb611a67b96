{{/* Object names: <release>-kubetune unless the release name already holds the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Recommended labels on every object. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector of the operator pods (stable across upgrades). */}}
{{- define "kubetune.operatorSelector" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "kubetune.fullname" .)) .Values.serviceAccount.operator.name -}}
{{- end -}}

{{/* An image: its repository as set, else <image.registry>/<name>; a placeholder registry fails the render. */}}
{{- define "kubetune.image" -}}
{{- $ctx := index . 0 -}}{{- $name := index . 1 -}}{{- $image := index $ctx.Values.image $name -}}
{{- $repository := $image.repository -}}
{{- if not $repository -}}
{{- $registry := $ctx.Values.image.registry | default "" | trimSuffix "/" -}}
{{- if or (not $registry) (regexMatch "REGISTRY|[<>]|example\\.(com|org|net)" $registry) -}}
{{- fail (printf "image.registry is %q, a placeholder: build and push the images first (make images REGISTRY=<your registry> TAG=%s), then install with --set image.registry=<your registry>" $registry $ctx.Chart.AppVersion) -}}
{{- end -}}
{{- $repository = printf "%s/%s" $registry $name -}}
{{- end -}}
{{- printf "%s:%s" $repository (default $ctx.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.image" (list . "operator") -}}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.image" (list . "trainer") -}}
{{- end -}}

{{/* Namespaces the operator watches in namespaced mode (JSON list; the release namespace by default). */}}
{{- define "kubetune.watchNamespaces" -}}
{{- if .Values.rbac.namespaces -}}
{{- .Values.rbac.namespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the trainer ServiceAccount (JSON list). */}}
{{- define "kubetune.trainerNamespaces" -}}
{{- $namespaces := list .Release.Namespace -}}
{{- if eq .Values.rbac.scope "namespaced" -}}
{{- $namespaces = include "kubetune.watchNamespaces" . | fromJsonArray -}}
{{- end -}}
{{- concat $namespaces .Values.serviceAccount.trainer.namespaces | uniq | toJson -}}
{{- end -}}

{{/* Fail at render time, with the value to change, when a switch needs CRDs the cluster lacks. */}}
{{- define "kubetune.requireApi" -}}
{{- $ctx := index . 0 -}}{{- $api := index . 1 -}}{{- $switch := index . 2 -}}{{- $remedy := index . 3 -}}
{{- if not ($ctx.Capabilities.APIVersions.Has $api) -}}
{{- fail (printf "%s=true needs the %s API, which this cluster does not serve: %s first, or set %s=false" $switch $api $remedy $switch) -}}
{{- end -}}
{{- end -}}
