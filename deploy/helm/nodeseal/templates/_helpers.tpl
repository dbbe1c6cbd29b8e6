{{/*
Names. nodeseal is one per cluster, so object names are fixed rather than derived from the
release name: the admission policies match the ServiceAccounts by name, keymgr checks that a
CSR comes from a pod of the agent DaemonSet by name, and the agent reads the keymgr-owned
objects by name. Each name is defined here once and passed to the programs that need it.
*/}}
{{- define "nodeseal.agentName" -}}nodeseal-agent{{- end }}
{{- define "nodeseal.keymgrName" -}}nodeseal-keymgr{{- end }}

{{/* Labels every object carries (Kubernetes' recommended labels). */}}
{{- define "nodeseal.labels" -}}
app.kubernetes.io/part-of: nodeseal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The name label of one component (`component` is agent or keymgr), added to its objects'
labels besides nodeseal.labels. */}}
{{- define "nodeseal.nameLabel" -}}
app.kubernetes.io/name: {{ printf "nodeseal-%s" .component }}
{{- end }}

{{/* Selector labels of one component: its name label and the release. */}}
{{- define "nodeseal.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "nodeseal-%s" .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "nodeseal.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Settings the agent and keymgr must agree on, as environment variables. */}}
{{- define "nodeseal.commonEnv" -}}
- name: NODESEAL_KUBERNETES
  value: "true"
- name: NODESEAL_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODESEAL_TRUST_DOMAIN
  value: {{ .Values.identity.trustDomain | quote }}
- name: NODESEAL_LOG_JSON
  value: "true"
{{- end }}
