{{/* Name helpers, labels, images and the operator's RBAC rules. */}}

{{- define "lora-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Cluster-scoped objects carry the release namespace: two releases of the same name in two
namespaces must not share (and fight over) one ClusterRole. RBAC names are not DNS labels, so no
63-character cut that could make two long namespace names collide. */}}
{{- define "lora-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "lora-operator.fullname" .) }}
{{- end }}

{{- define "lora-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lora-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lora-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lora-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{/* "repository:tag" or "repository@digest"; the tag defaults to the appVersion. */}}
{{- define "lora-operator.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "lora-operator.trainerImage" -}}
{{- include "lora-operator.image" (list .Values.trainer.image .) }}
{{- end }}

{{- define "lora-operator.credentialsSecretName" -}}
{{- if .Values.objectStore.existingSecret }}
{{- .Values.objectStore.existingSecret }}
{{- else if .Values.objectStore.credentials.accessKeyId }}
{{- printf "%s-s3" (include "lora-operator.fullname" .) }}
{{- end }}
{{- end }}

{{/* Whether the operator may `get` Secrets: only to read a job's own storage credentials, and only
when it has no object-store credentials of its own. */}}
{{- define "lora-operator.readJobSecrets" -}}
{{- if and .Values.operator.readJobSecrets (not (include "lora-operator.credentialsSecretName" .)) }}true{{ end }}
{{- end }}

{{/*
The rules the operator needs in every namespace it watches, and nothing more. They mirror
lora_operator.config.RBAC_RULES (tests/chart/test_chart.py keeps the two equal):
- its own resource: read and watch, patch for kopf's annotations, status through the subresource;
  finalizers/update because children carry blockOwnerDeletion owner references;
- batch Jobs: created (Kueue-suspendable), watched, patched (spec.suspend); deleted only by the
  garbage collector through owner references, so no delete;
- ConfigMaps and Services (job config, headless Service of multi-node jobs): get and create;
- NetworkPolicies (one per job, with networkPolicy.enabled): get and create;
- Pods and ResourceQuotas: list only (failure reasons; GPU quota check); never create;
- Events: create (the operator's and kopf's, core v1);
- Secrets: `get` by name only, and only with "lora-operator.readJobSecrets" (off by default);
- Kueue Workloads: list (Kueue's reason a job waits or was preempted), patch (spec.active=false
  releases the quota of a suspended job). Kueue is detected through API discovery, which every
  authenticated user may read.
*/}}
{{- define "lora-operator.namespacedRules" -}}
{{- /* no patch of the jobs themselves: only their status is written (kopf keeps no state on them:
jobs reach the operator through an event handler, handlers/kopf_handlers.py) */}}
- apiGroups: ["training.lora.dev"]
  resources: ["loratrainingjobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["training.lora.dev"]
  resources: ["loratrainingjobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["training.lora.dev"]
  resources: ["loratrainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["training.lora.dev"]
  resources: ["loraadapterchannels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["training.lora.dev"]
  resources: ["loraadapterchannels/status"]
  verbs: ["get", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create"]
{{- if .Values.networkPolicy.enabled }}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
{{- end }}
{{- /* the vLLM LoRA syncer ConfigMaps of channels; the operator replaces only ones it created */}}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods", "resourcequotas"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- if include "lora-operator.readJobSecrets" . }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end }}

{{/* kopf scans CRDs to learn when its resource appears or changes and, cluster-wide, watches
namespaces. Both read only. */}}
{{- define "lora-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .Values.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
