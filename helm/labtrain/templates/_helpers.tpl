{{/* Naming ---------------------------------------------------------------------------------------------- */}}

{{- define "labtrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource and the RayCluster's name; KubeRay's head Service is "<fullname>-head-svc",
so it stays short enough for the generated names (KubeRay appends up to 15 characters). */}}
{{- define "labtrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "labtrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "labtrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "labtrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "labtrain.labels" -}}
helm.sh/chart: {{ include "labtrain.chart" . }}
{{ include "labtrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "labtrain.queueName" -}}
{{- printf "%s-queue" (include "labtrain.fullname" .) }}
{{- end }}

{{/* KubeRay's head Service; the Job API is on its port 8265. */}}
{{- define "labtrain.headService" -}}
{{- printf "%s-head-svc" (include "labtrain.fullname" .) }}
{{- end }}

{{- define "labtrain.jobApiUrl" -}}
{{- printf "http://%s.%s.svc:8265" (include "labtrain.headService" .) .Release.Namespace }}
{{- end }}

{{- define "labtrain.queueUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "labtrain.queueName" .) .Release.Namespace .Values.queue.port }}
{{- end }}

{{/* Images ---------------------------------------------------------------------------------------------- */}}

{{- define "labtrain.image" -}}
{{- if .Values.image.repository }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Secrets --------------------------------------------------------------------------------------------- */}}

{{- define "labtrain.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "labtrain.fullname" .)) .Values.rayAuth.existingSecret }}
{{- end }}

{{- define "labtrain.queueSecret" -}}
{{- default (include "labtrain.queueName" .) .Values.queue.adminToken.existingSecret }}
{{- end }}

{{- define "labtrain.usersSecret" -}}
{{- default (printf "%s-users" (include "labtrain.queueName" .)) .Values.queue.usersSecret }}
{{- end }}

{{/* A token that survives `helm upgrade`: the value if set, else the one already in the Secret, else random. */}}
{{- define "labtrain.keptToken" -}}
{{- $ctx := index . 0 }}{{- $secret := index . 1 }}{{- $key := index . 2 }}{{- $value := index . 3 }}
{{- if $value }}
{{- $value | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace $secret }}
{{- $data := get (default dict $existing) "data" | default dict }}
{{- if hasKey $data $key }}
{{- index $data $key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod parts ------------------------------------------------------------------------------------------- */}}

{{/* Env of every client of the Job API (Ray containers, autoscaler, queue, test pod): Ray token auth. */}}
{{- define "labtrain.rayAuthEnv" -}}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "labtrain.rayAuthSecret" . }}
      key: {{ .Values.rayAuth.secretKey }}
{{- end }}
{{- end }}

{{/* The storage root every Ray pod shares: storage.root, else s3://<bucket>/<prefix>, else the claim's mount; empty: none. */}}
{{- define "labtrain.storageRoot" -}}
{{- $root := .Values.storage.root }}
{{- if and (not $root) .Values.s3.enabled .Values.s3.bucket }}
{{- $root = printf "s3://%s/%s" .Values.s3.bucket .Values.s3.prefix | trimSuffix "/" }}
{{- end }}
{{- if and (not $root) .Values.storage.existingClaim }}
{{- $root = .Values.storage.mountPath }}
{{- end }}
{{- $root }}
{{- end }}

{{/* The queue's completion records (LABTRAIN_QUEUE_DONE_DIR): under the storage root when the queue's pod reaches
it too (S3, or the shared claim it mounts), else off (exactly-once across a cluster restart then needs them). */}}
{{- define "labtrain.queueDoneDir" -}}
{{- $root := include "labtrain.storageRoot" . }}
{{- if and $root (or (hasPrefix "s3://" $root) (and .Values.storage.existingClaim (hasPrefix .Values.storage.mountPath $root))) }}
{{- printf "%s/queue/done" (trimSuffix "/" $root) }}
{{- else }}off{{- end }}
{{- end }}

{{/* The S3 settings of a pod: the standard AWS variables. */}}
{{- define "labtrain.s3Env" -}}
{{- if .Values.s3.enabled }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* Env of every Ray container: auth, metrics directory, storage root, S3. */}}
{{- define "labtrain.rayEnv" -}}
{{- include "labtrain.rayAuthEnv" . }}
- name: LABTRAIN_METRICS_DIR
  value: {{ .Values.metrics.dir | quote }}
{{- with include "labtrain.storageRoot" . }}
- name: LABTRAIN_STORAGE_ROOT
  value: {{ . | quote }}
{{- end }}
{{- include "labtrain.s3Env" . }}
{{- if .Values.ray.autoscaling.enabled }}
# The nodes the autoscaler may start: a Ray Train run refuses a gang that even all of them could not hold.
- name: LABTRAIN_AUTOSCALING
  value: {{ include "labtrain.nodeTypes" . | quote }}
{{- end }}
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "labtrain.containerSecurityContext" -}}
{{- $ctx := index . 0 }}
{{- toYaml (merge (dict "readOnlyRootFilesystem" (index . 1)) $ctx.Values.containerSecurityContext) }}
{{- end }}

{{/* The per-node exporter: serves every process's metrics from the shared LABTRAIN_METRICS_DIR. */}}
{{- define "labtrain.exporterContainer" -}}
- name: metrics-exporter
  image: {{ include "labtrain.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [labtrain, metrics, serve, --port, {{ .Values.metrics.port | quote }}, --dir, {{ .Values.metrics.dir | quote }}]
  ports:
    - name: lt-metrics
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /metrics
      port: lt-metrics
    periodSeconds: 30
  resources:
    {{- toYaml .Values.metrics.resources | nindent 4 }}
  securityContext:
    {{- include "labtrain.containerSecurityContext" (list . true) | nindent 4 }}
  volumeMounts:
    - name: labtrain-metrics
      mountPath: {{ .Values.metrics.dir }}
{{- end }}

{{/* Volumes and mounts of a Ray pod; $shm is the /dev/shm size. */}}
{{- define "labtrain.rayVolumes" -}}
{{- $ctx := index . 0 }}{{- $shm := index . 1 }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $shm }}
- name: labtrain-metrics
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- with $ctx.Values.storage.existingClaim }}
- name: storage
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- end }}

{{- define "labtrain.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: labtrain-metrics
  mountPath: {{ .Values.metrics.dir }}
- name: tmp
  mountPath: /tmp
{{- if .Values.storage.existingClaim }}
- name: storage
  mountPath: {{ .Values.storage.mountPath }}
{{- end }}
{{- end }}

{{/* Validation ------------------------------------------------------------------------------------------ */}}

{{- define "labtrain.fail" -}}
{{- fail (printf "labtrain: %s" .) }}
{{- end }}

{{/* A count: a whole number >= 0. */}}
{{- define "labtrain.checkCount" -}}
{{- $where := index . 0 }}{{- $v := index . 1 }}
{{- if not (or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "float64" $v)) }}
{{- include "labtrain.fail" (printf "%s must be a whole number >= 0, got %v (%s)" $where $v (kindOf $v)) }}
{{- end }}
{{- if or (lt (float64 $v) 0.0) (ne (float64 (int64 $v)) (float64 $v)) }}
{{- include "labtrain.fail" (printf "%s must be a whole number >= 0, got %v" $where $v) }}
{{- end }}
{{- end }}

{{/* Fails rendering with one message naming the value, the bad setting and what is allowed. */}}
{{- define "labtrain.validate" -}}
{{- if not (regexMatch "^[0-9]+\\.[0-9]+\\.[0-9]+$" (toString .Values.ray.version)) }}
{{- include "labtrain.fail" (printf "ray.version must be a Ray release like 2.60.0, got %q" (toString .Values.ray.version)) }}
{{- end }}
{{- if not (has .Values.ray.autoscaling.upscalingMode (list "Conservative" "Default" "Aggressive")) }}
{{- include "labtrain.fail" (printf "ray.autoscaling.upscalingMode must be Conservative, Default or Aggressive, got %q" (toString .Values.ray.autoscaling.upscalingMode)) }}
{{- end }}
{{- if and .Values.ray.autoscaling.enabled .Values.queue.enabled (not .Values.queue.capacity) }}
{{- include "labtrain.fail" "ray.autoscaling.enabled needs queue.capacity (e.g. {CPU: 256, GPU: 32}, the cluster at maxReplicas): the queue admits against what exists, so with workers scaled to zero it would never admit a job and Ray would never scale up" }}
{{- end }}
{{- if not (regexMatch "^[a-z]" .Release.Name) }}
{{- include "labtrain.fail" (printf "the release name %q must start with a letter: the RayCluster is named after it and KubeRay wants a DNS-1035 name" .Release.Name) }}
{{- end }}
{{- range $name, $g := .Values.workerGroups }}
{{- $where := printf "workerGroups.%s" $name }}
{{- if not (kindIs "map" $g) }}
{{- include "labtrain.fail" (printf "%s must be a map of settings, got %v" $where $g) }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$" $name) }}
{{- include "labtrain.fail" (printf "worker group name %q must be a DNS label: lower-case letters, digits and '-', at most 32 characters" $name) }}
{{- end }}
{{- if or (not (hasKey $g "enabled")) $g.enabled }}
{{- if not (or $g.image (include "labtrain.image" $)) }}
{{- include "labtrain.fail" (printf "%s has no image: set %s.image or image.repository" $where $where) }}
{{- end }}
{{- range $field := list "replicas" "minReplicas" "maxReplicas" "gpu" }}
{{- if not (hasKey $g $field) }}
{{- include "labtrain.fail" (printf "%s.%s is not set" $where $field) }}
{{- end }}
{{- include "labtrain.checkCount" (list (printf "%s.%s" $where $field) (index $g $field)) }}
{{- end }}
{{- if or (gt (int64 $g.minReplicas) (int64 $g.replicas)) (gt (int64 $g.replicas) (int64 $g.maxReplicas)) }}
{{- include "labtrain.fail" (printf "%s needs minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" $where $g.minReplicas $g.replicas $g.maxReplicas) }}
{{- end }}
{{- range $field := list "cpu" "memory" "shmSize" }}
{{- if not (index $g $field) }}
{{- include "labtrain.fail" (printf "%s.%s is not set" $where $field) }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[1-9][0-9]*$" (toString $g.cpu)) }}
{{- include "labtrain.fail" (printf "%s.cpu must be a whole number of CPUs like \"8\" (Ray counts whole CPUs on a node, and the gang check reads it), got %q" $where (toString $g.cpu)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* After the groups, so that a group without an image is named. The head, the exporter, the queue and the test pod use it. */}}
{{- if not (include "labtrain.image" .) }}
{{- include "labtrain.fail" "image.repository is empty: set it to the labtrain image built from the Dockerfile" }}
{{- end }}
{{- $db := .Values.queue.database }}
{{- if .Values.queue.enabled }}
{{- if not (has $db.type (list "sqlite" "postgresql")) }}
{{- include "labtrain.fail" (printf "queue.database.type must be sqlite or postgresql, got %q" (toString $db.type)) }}
{{- end }}
{{- if and (eq $db.type "postgresql") (not $db.postgresql.existingSecret) }}
{{- include "labtrain.fail" "queue.database.postgresql.existingSecret is empty: name the Secret that holds the postgresql:// URL" }}
{{- end }}
{{- include "labtrain.checkCount" (list "queue.replicas" .Values.queue.replicas) }}
{{- if gt (int64 .Values.queue.replicas) 1 }}
{{- include "labtrain.fail" (printf "queue.replicas is %v but the queue's dispatcher must be the only one (two would both admit and start jobs): use 1" .Values.queue.replicas) }}
{{- end }}
{{- if and .Values.queue.adminToken.value (lt (len .Values.queue.adminToken.value) 16) }}
{{- include "labtrain.fail" "queue.adminToken.value must be at least 16 characters" }}
{{- end }}
{{- range $i, $u := .Values.queue.users }}
{{- if not (and (kindIs "map" $u) $u.name (regexMatch "^[a-z_][a-z0-9_.-]{0,63}$" (toString $u.name))) }}
{{- include "labtrain.fail" (printf "queue.users[%d] needs a name of lower-case letters, digits, '_', '.', '-', got %v" $i $u) }}
{{- end }}
{{- if and (hasKey $u "share") (le (float64 $u.share) 0.0) }}
{{- include "labtrain.fail" (printf "queue.users[%d] (%s): share must be > 0, got %v" $i $u.name $u.share) }}
{{- end }}
{{- range $k, $v := (default dict $u.quotas) }}
{{- if not (has $k (list "gpus" "cpus" "jobs")) }}
{{- include "labtrain.fail" (printf "queue.users[%d] (%s): unknown quota %q; use gpus, cpus or jobs" $i $u.name $k) }}
{{- end }}
{{- if lt (float64 $v) 0.0 }}
{{- include "labtrain.fail" (printf "queue.users[%d] (%s): quotas.%s must be >= 0, got %v" $i $u.name $k $v) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The enabled worker groups as Ray node types, JSON: [{"group", "resources": {CPU, GPU, custom...}, "max"}]. */}}
{{- define "labtrain.nodeTypes" -}}
{{- $types := list }}
{{- range $name, $g := .Values.workerGroups }}
{{- if or (not (hasKey $g "enabled")) $g.enabled }}
{{- $start := default dict $g.rayStartParams }}
{{- $res := dict "CPU" (float64 (default $g.cpu (get $start "num-cpus"))) }}
{{- $gpus := float64 (default $g.gpu (get $start "num-gpus")) }}
{{- if gt $gpus 0.0 }}{{ $_ := set $res "GPU" $gpus }}{{ end }}
{{- range $k, $v := $g.rayResources }}{{ $_ := set $res $k $v }}{{ end }}
{{- $types = append $types (dict "group" $name "resources" $res "max" (int64 $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- toJson $types }}
{{- end }}

{{/* NCCL's environment in a GPU group's Ray container: nccl.env, and the RDMA path or its explicit absence. */}}
{{- define "labtrain.ncclEnv" -}}
{{- range $k, $v := .Values.nccl.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- if .Values.nccl.rdma.enabled }}
{{- with .Values.nccl.rdma.hca }}
- name: NCCL_IB_HCA
  value: {{ . | quote }}
{{- end }}
{{- else }}
- name: NCCL_IB_DISABLE
  value: "1"
{{- end }}
{{- end }}
