{{/* Names and labels. */}}
{{- define "warden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "warden.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "warden.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "warden.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "warden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "warden.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "warden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: warden
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels of the pods Warden runs in: the gateway's, or the agent's in sidecar mode. */}}
{{- define "warden.podSelectorLabels" -}}
{{ include "warden.selectorLabels" . }}
app.kubernetes.io/component: {{ ternary "gateway" "agent" (eq .Values.mode "gateway") }}
{{- end -}}

{{- define "warden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "warden.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "warden.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "warden.secretName" -}}
{{- default (include "warden.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "warden.configMapName" -}}
{{- printf "%s-config" (include "warden.fullname" .) -}}
{{- end -}}

{{- define "warden.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "warden.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{- define "warden.hasPolicyConfigMap" -}}
{{- if or .Values.policy.files .Values.policy.existingConfigMap }}true{{ end -}}
{{- end -}}

{{- define "warden.hasSigningKey" -}}
{{- if ternary .Values.secrets.existingSecretHas.signingKey .Values.secrets.signingKey (ne .Values.secrets.existingSecret "") }}true{{ end -}}
{{- end -}}

{{- define "warden.hasStatePassword" -}}
{{- if ternary .Values.secrets.existingSecretHas.statePassword .Values.secrets.statePassword (ne .Values.secrets.existingSecret "") }}true{{ end -}}
{{- end -}}

{{- define "warden.hasAuditShipPassword" -}}
{{- if ternary .Values.secrets.existingSecretHas.auditShipPassword .Values.secrets.auditShipPassword (ne .Values.secrets.existingSecret "") }}true{{ end -}}
{{- end -}}

{{/* config.audit.ship, or an empty dict when the audit log is not shipped. */}}
{{- define "warden.auditShip" -}}
{{- ((.Values.config | default dict).audit | default dict).ship | default dict | toYaml -}}
{{- end -}}

{{- define "warden.hasSecretVolume" -}}
{{- if or (include "warden.hasSigningKey" .) (include "warden.hasStatePassword" .) (include "warden.hasAuditShipPassword" .) }}true{{ end -}}
{{- end -}}

{{- define "warden.stateUrl" -}}
{{- (.Values.config.state | default dict).url | default "sqlite:///./warden-data/state.db" -}}
{{- end -}}

{{/* "true" when the gateway may run more than one pod (several replicas or the HPA). */}}
{{- define "warden.gatewayShared" -}}
{{- if or (gt (int .Values.gateway.replicaCount) 1) .Values.gateway.autoscaling.enabled }}true{{ end -}}
{{- end -}}

{{/*
"true" when Warden's pods keep their data on the claim at one fixed path: a
sidecar, or a gateway of one pod. Only one Warden may hold that audit log (it
takes a lock at start), so a rollout must stop the old pod before the new one
starts (strategy Recreate). A shared gateway gives each pod its own sub-folder.
*/}}
{{- define "warden.singleDataPath" -}}
{{- if and .Values.persistence.enabled (not (and (eq .Values.mode "gateway") (include "warden.gatewayShared" .))) }}true{{ end -}}
{{- end -}}

{{/* "true" when the chart renders its NetworkPolicy. */}}
{{- define "warden.hasNetworkPolicy" -}}
{{- $np := .Values.networkPolicy -}}
{{- if and $np.enabled (or (eq .Values.mode "gateway") .Values.agent.image $np.podSelector) }}true{{ end -}}
{{- end -}}

{{/*
"true" when some egress rule of the NetworkPolicy may open TCP port .port: a
networkPolicy.upstreams or stateStore entry that lists it, or an extraEgress
rule without ports, with that port (or a range holding it) or a named port.
*/}}
{{- define "warden.egressOpens" -}}
{{- $np := .np -}}
{{- $port := int .port -}}
{{- $open := false -}}
{{- range (concat ($np.upstreams | default list) ($np.stateStore | default list)) -}}
{{- range .ports -}}
{{- if eq (int .) $port }}{{ $open = true }}{{ end -}}
{{- end -}}
{{- end -}}
{{- range ($np.extraEgress | default list) -}}
{{- if not .ports }}{{ $open = true }}{{ end -}}
{{- range (.ports | default list) -}}
{{- if not (hasKey . "port") -}}
{{- $open = true -}}
{{- else if not (regexMatch "^[0-9]+$" (toString .port)) -}}
{{- /* A named port: the chart cannot tell which number it stands for. */ -}}
{{- $open = true -}}
{{- else if and (le (int .port) $port) (ge (int (.endPort | default .port)) $port) -}}
{{- $open = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $open }}true{{ end -}}
{{- end -}}

{{/*
The TCP ports of a postgresql:// URL's hosts (5432 when none is given), as a
JSON list: "postgresql://u@h1:5433,h2/db" gives [5433,5432], and a query's port=
(which libpq takes over the host part's) its ports.
*/}}
{{- define "warden.postgresPorts" -}}
{{- $authority := regexReplaceAll "^[A-Za-z]+://([^/?#]*).*$" . "${1}" -}}
{{- $hosts := last (splitList "@" $authority) -}}
{{- $ports := list -}}
{{- range (splitList "," $hosts) -}}
{{- $found := regexFind ":[0-9]+$" . -}}
{{- $ports = append $ports (ternary (trimPrefix ":" $found | int) 5432 (ne $found "")) -}}
{{- end -}}
{{- /* libpq's port= in the query overrides the URL's ports: "?host=pgbouncer&port=6432". */ -}}
{{- $query := regexFind "[?&]port=[^&#]*" . -}}
{{- if $query -}}
{{- $ports = list -}}
{{- range (splitList "," (regexReplaceAll "^[?&]port=" $query "")) -}}
{{- $ports = append $ports (ternary (int .) 5432 (regexMatch "^[0-9]+$" .)) -}}
{{- end -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{/*
warden.yaml: the user's config, with listen, policy source and secret file
paths set by the chart. Secrets never appear here.
*/}}
{{- define "warden.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $proxyHost := ternary "0.0.0.0" "127.0.0.1" (eq .Values.mode "gateway") -}}
{{- $listen := dict "proxy" (printf "%s:%v" $proxyHost .Values.ports.proxy) "admin" (printf "0.0.0.0:%v" .Values.ports.admin) -}}
{{- if .Values.ports.grpc -}}
{{- /* Sidecar: the agent is the only client, on loopback; no other pod may ask as it. */ -}}
{{- $_ := set $listen "grpc" (printf "%s:%v" $proxyHost .Values.ports.grpc) -}}
{{- end -}}
{{- $_ := set $cfg "listen" $listen -}}
{{- if eq .Values.mode "gateway" -}}
{{- /* Any pod may call a gateway: a request without a key or token must not pass as
agent.id (an agent whose kill switch is thrown would drop its key and carry on). */ -}}
{{- $identity := deepCopy ($cfg.identity | default dict) -}}
{{- if not (hasKey $identity "require_proof") -}}
{{- $_ := set $identity "require_proof" true -}}
{{- end -}}
{{- $_ := set $cfg "identity" $identity -}}
{{- end -}}
{{- $policy := deepCopy ($cfg.policy | default dict) -}}
{{- if .Values.policy.bundleUrl -}}
{{- $_ := set $policy "bundle_url" .Values.policy.bundleUrl -}}
{{- else if include "warden.hasPolicyConfigMap" . -}}
{{- $_ := set $policy "bundles" (list "/etc/warden/policy") -}}
{{- end -}}
{{- if $policy -}}
{{- $_ := set $cfg "policy" $policy -}}
{{- end -}}
{{- if include "warden.hasSigningKey" . -}}
{{- $audit := deepCopy ($cfg.audit | default dict) -}}
{{- $_ := set $audit "signing_key_file" "/etc/warden/secrets/signing-key.pem" -}}
{{- $_ := set $cfg "audit" $audit -}}
{{- end -}}
{{- if and (include "warden.hasAuditShipPassword" .) ($cfg.audit | default dict).ship -}}
{{- $audit := deepCopy ($cfg.audit | default dict) -}}
{{- $ship := deepCopy $audit.ship -}}
{{- $_ := set $ship "password_file" "/etc/warden/secrets/audit-ship-password" -}}
{{- $_ := set $audit "ship" $ship -}}
{{- $_ := set $cfg "audit" $audit -}}
{{- end -}}
{{- if include "warden.hasStatePassword" . -}}
{{- $state := deepCopy ($cfg.state | default dict) -}}
{{- $_ := set $state "password_file" "/etc/warden/secrets/state-password" -}}
{{- $_ := set $cfg "state" $state -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
The Warden container, from files/sidecar.yaml (the same file `warden inject`
starts from: src/warden/data/kubernetes/sidecar.yaml), with the image,
resources, ports and env set from values. Rendered as a one-item list:
  initContainers:
    {{- include "warden.sidecar" .Subcharts.warden | nindent 4 }}
*/}}
{{- define "warden.container" -}}
{{- $c := .Files.Get "files/sidecar.yaml" | fromYaml -}}
{{- $_ := set $c "image" (include "warden.image" .) -}}
{{- $_ := set $c "imagePullPolicy" .Values.image.pullPolicy -}}
{{- if .Values.resources -}}
{{- $_ := set $c "resources" .Values.resources -}}
{{- end -}}
{{- $ports := list -}}
{{- range $c.ports -}}
{{- $p := deepCopy . -}}
{{- if eq $p.name "warden-proxy" }}{{ $_ := set $p "containerPort" (int $.Values.ports.proxy) }}{{ end -}}
{{- if eq $p.name "warden-admin" }}{{ $_ := set $p "containerPort" (int $.Values.ports.admin) }}{{ end -}}
{{- $ports = append $ports $p -}}
{{- end -}}
{{- if .Values.ports.grpc -}}
{{- $ports = append $ports (dict "name" "warden-grpc" "containerPort" (int .Values.ports.grpc) "protocol" "TCP") -}}
{{- end -}}
{{- $_ := set $c "ports" $ports -}}
{{- $env := list -}}
{{- $secret := include "warden.secretName" . -}}
{{- $external := ne .Values.secrets.existingSecret "" -}}
{{- if or $external .Values.secrets.adminTokens -}}
{{- $env = append $env (dict "name" "WARDEN_ADMIN__TOKENS" "valueFrom" (dict "secretKeyRef" (dict "name" $secret "key" "admin-tokens" "optional" $external))) -}}
{{- end -}}
{{- if or $external .Values.secrets.agentKeys -}}
{{- $env = append $env (dict "name" "WARDEN_IDENTITY__AGENTS" "valueFrom" (dict "secretKeyRef" (dict "name" $secret "key" "agent-keys" "optional" $external))) -}}
{{- end -}}
{{- $env = concat $env (.Values.env | default list) -}}
{{- if $env -}}
{{- $_ := set $c "env" $env -}}
{{- end -}}
{{- $mounts := $c.volumeMounts -}}
{{- if include "warden.hasPolicyConfigMap" . -}}
{{- $mounts = append $mounts (dict "name" "warden-policy" "mountPath" "/etc/warden/policy" "readOnly" true) -}}
{{- end -}}
{{- if include "warden.hasSecretVolume" . -}}
{{- $mounts = append $mounts (dict "name" "warden-secrets" "mountPath" "/etc/warden/secrets" "readOnly" true) -}}
{{- end -}}
{{- $_ := set $c "volumeMounts" $mounts -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "warden.sidecar" -}}
{{- list (include "warden.container" . | fromYaml) | toYaml -}}
{{- end -}}

{{/* The volumes the Warden container mounts; include them in the pod's volumes. */}}
{{- define "warden.volumes" -}}
- name: warden-config
  configMap:
    name: {{ include "warden.configMapName" . }}
- name: warden-data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "warden.fullname" .)) .Values.persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: warden-tmp
  emptyDir:
    {{- with .Values.tmpVolume.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- if include "warden.hasPolicyConfigMap" . }}
- name: warden-policy
  configMap:
    name: {{ include "warden.policyConfigMapName" . }}
{{- end }}
{{- if include "warden.hasSecretVolume" . }}
- name: warden-secrets
  secret:
    secretName: {{ include "warden.secretName" . }}
    defaultMode: 0400
    items:
{{- if include "warden.hasSigningKey" . }}
      - {key: signing-key.pem, path: signing-key.pem}
{{- end }}
{{- if include "warden.hasStatePassword" . }}
      - {key: state-password, path: state-password}
{{- end }}
{{- if include "warden.hasAuditShipPassword" . }}
      - {key: audit-ship-password, path: audit-ship-password}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings both modes share. */}}
{{- define "warden.terminationGracePeriodSeconds" -}}
{{- $grace := (.Values.config | default dict).shutdown_grace_s | default 20 -}}
{{- add (ceil $grace | int) (int .Values.shutdownGraceMarginSeconds) -}}
{{- end -}}

{{- define "warden.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Checks that fail the install with a message naming the value. */}}
{{- define "warden.validate" -}}
{{- if not (has .Values.mode (list "sidecar" "gateway")) -}}
{{- fail (printf "mode: %q must be sidecar or gateway" .Values.mode) -}}
{{- end -}}
{{- if eq .Values.mode "gateway" -}}
{{- $identity := (.Values.config | default dict).identity | default dict -}}
{{- if and (hasKey $identity "require_proof") (not $identity.require_proof) (not .Values.gateway.allowUnprovenDefaultAgent) -}}
{{- fail "config.identity.require_proof=false in gateway mode: any pod that reaches the gateway is served as config.agent.id without a key or token, and an agent whose kill switch is thrown drops its key and carries on; leave require_proof on (the chart's default here), or set gateway.allowUnprovenDefaultAgent=true to accept that" -}}
{{- end -}}
{{- if and (include "warden.gatewayShared" .) (hasPrefix "sqlite" (include "warden.stateUrl" .)) -}}
{{- fail "gateway mode with more than one replica needs a shared state store: set config.state.url to postgresql://... (or run one pod on SQLite: gateway.replicaCount=1, gateway.autoscaling.enabled=false and persistence.enabled=true, so that kill switches, budgets and approvals outlive the pod)" -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") .Values.agent.image .Values.persistence.enabled (gt (int .Values.agent.replicaCount) 1) -}}
{{- fail (printf "agent.replicaCount=%v with persistence.enabled: every replica would mount the same claim at /var/lib/warden, and a Warden holds its audit log's lock while it runs, so only one pod could start; keep agent.replicaCount=1 (the chart replaces the pod with strategy Recreate), or run several replicas with persistence.enabled=false, PostgreSQL state and each pod's audit log shipped to the central store (config.state.url, config.audit.ship.url; docs/state.md, \"Fleet setup\")" .Values.agent.replicaCount) -}}
{{- end -}}
{{- if and .Values.policy.bundleUrl (or .Values.policy.files .Values.policy.existingConfigMap) -}}
{{- fail "policy: set one of files, existingConfigMap and bundleUrl" -}}
{{- end -}}
{{- $ship := include "warden.auditShip" . | fromYaml -}}
{{- if and .Values.secrets.auditShipPassword (not $ship) -}}
{{- fail "secrets.auditShipPassword is set but config.audit.ship is not: set config.audit.ship.url to the central audit store" -}}
{{- end -}}
{{- if and $ship (not (hasPrefix "postgres" ($ship.url | default ""))) -}}
{{- fail "config.audit.ship.url: the central audit store must be postgresql://user@host:5432/db" -}}
{{- end -}}
{{- if and .Values.policy.files .Values.policy.existingConfigMap -}}
{{- fail "policy: set one of files, existingConfigMap and bundleUrl" -}}
{{- end -}}
{{- /* The chart's own NetworkPolicy must not cut Warden off from its state store or
     central audit store without a word. */ -}}
{{- if include "warden.hasNetworkPolicy" . -}}
{{- $databases := list -}}
{{- $state := include "warden.stateUrl" . -}}
{{- if hasPrefix "postgres" $state }}{{ $databases = append $databases (list "config.state.url" $state) }}{{ end -}}
{{- $shipUrl := $ship.url | default "" -}}
{{- if hasPrefix "postgres" $shipUrl }}{{ $databases = append $databases (list "config.audit.ship.url" $shipUrl) }}{{ end -}}
{{- range $databases -}}
{{- $key := index . 0 -}}
{{- range (include "warden.postgresPorts" (index . 1) | fromJsonArray) -}}
{{- if not (include "warden.egressOpens" (dict "np" $.Values.networkPolicy "port" .)) -}}
{{- fail (printf "networkPolicy: %s names PostgreSQL on port %v, but no egress rule opens that port, so the chart's NetworkPolicy would block Warden from its database: list the database's addresses in networkPolicy.stateStore (e.g. [{cidr: 10.0.12.0/24, ports: [%v]}]), or allow it in networkPolicy.extraEgress (e.g. by namespaceSelector for an in-cluster database)" $key . .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.mode "sidecar" -}}
{{- $sso := ((.Values.config | default dict).console | default dict).sso | default dict -}}
{{- range ($sso.trusted_proxies | default list) -}}
{{- if contains ":" (toString .) -}}
{{- fail (printf "config.console.sso.trusted_proxies: %s is an IPv6 entry, refused in sidecar mode: the chart's admin listener is IPv4 (0.0.0.0), so no auth proxy reaches it over IPv6, and an IPv6 entry can take in the pod's loopback (::1, however it is spelled), which the agent shares; name the auth proxy's IPv4 address (docs/deploy.md)" .) -}}
{{- end -}}
{{- if include "warden.isLoopback" (toString .) -}}
{{- fail (printf "config.console.sso.trusted_proxies: %s takes in the pod's loopback (127.0.0.0/8, ::1), which the agent shares in sidecar mode: it could send the sign-on headers itself and act in the console (clear its own kill switch); name only the auth proxy's own address, outside the agent's pod (docs/deploy.md)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The checks above read config: a WARDEN_* variable would get around them. Warden
     reads the name past WARDEN_ in any case, and a whole section from one variable. */ -}}
{{- range (.Values.env | default list) -}}
{{- if regexMatch "^WARDEN_(IDENTITY(__.*)?|CONSOLE|CONSOLE__SSO(__.*)?)$" (upper (toString .name)) -}}
{{- fail (printf "env: %s would set identity or console.sso settings, which the chart checks only under config: set them as config.identity... or config.console.sso... instead" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"true" when an IPv4 trusted_proxies entry (an address or address/prefix, as the
schema allows) takes in any of 127.0.0.0/8. IPv6 entries are refused before this
in sidecar mode.
*/}}
{{- define "warden.isLoopback" -}}
{{- $parts := splitList "/" . -}}
{{- $addr := first $parts -}}
{{- if not (contains ":" $addr) -}}
{{- $o := splitList "." $addr -}}
{{- $ip := add (mul (atoi (index $o 0)) 16777216) (mul (atoi (index $o 1)) 65536) (mul (atoi (index $o 2)) 256) (atoi (index $o 3)) -}}
{{- $prefix := ternary (last $parts) "32" (eq (len $parts) 2) | atoi -}}
{{- /* The entry overlaps 127.0.0.0/8 when both agree on the first min(prefix, 8) bits. */ -}}
{{- $block := 1 -}}
{{- range until (sub 32 (min $prefix 8) | int) -}}
{{- $block = mul $block 2 -}}
{{- end -}}
{{- if eq (div $ip $block) (div 2130706432 $block) }}true{{ end -}}
{{- end -}}
{{- end -}}
