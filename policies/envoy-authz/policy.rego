# Envoy ext_authz example: an OPA-Envoy-style policy that Warden runs unchanged.
#
# Warden evaluates `data.envoy.authz.allow` (ext_authz.query) for every
# request Envoy checks. The input is OPA-Envoy's (input.attributes.request.http,
# input.parsed_path, input.parsed_query, input.parsed_body, ...) plus Warden's
# own: input.agent, input.context and input.action, whose `tool` and
# `arguments` are set when a route rule of ext_authz.upstream maps the request
# to a tool call. The result is an object, as OPA-Envoy reads it: `allowed`,
# `headers`, `request_headers_to_remove`, `response_headers_to_add`, `body`,
# `http_status`, `dynamic_metadata`. Tokens and limits live in data.json.
package envoy.authz

import rego.v1

# Paths into input are written out in full (not through an alias such as
# `http := input.attributes.request.http`): Warden's decision cache keys on the
# parts of input a policy reads, and the whole request (with its per-request
# ids) would make every check a cache miss.
# Denied unless a rule below says otherwise.
default allow := {
	"allowed": false,
	"http_status": 403,
	"body": "forbidden: this request is not allowed for your role",
	"headers": {"x-ext-authz-check": "denied"},
}

allow := {
	"allowed": true,
	"headers": {"x-ext-authz-check": "allowed", "x-user-role": role_name},
	"request_headers_to_remove": ["x-debug-override"],
	"response_headers_to_add": {"x-governed-by": "warden"},
	"dynamic_metadata": {"role": role_name},
} if {
	permitted
}

allow := {
	"allowed": false,
	"http_status": 401,
	"body": "unauthorized: send Authorization: Bearer <token>",
	"headers": {"www-authenticate": "Bearer"},
} if {
	not permitted
	not role
}

# The caller's role: "anonymous" on public paths without a token.
role_name := role if role
role_name := "anonymous" if not role

permitted if {
	input.attributes.request.http.method == "GET"
	public_path(input.parsed_path)
}

permitted if {
	role in {"reader", "support"}
	input.attributes.request.http.method == "GET"
}

# A refund (a route rule maps POST /orders/{order_id}/refunds to issue_refund)
# is for support staff, up to the limit.
permitted if {
	role == "support"
	refund_allowed(input.action)
}

refund_allowed(action) if {
	action.tool == "issue_refund"
	is_number(action.arguments.amount)
	action.arguments.amount <= data.envoy.authz.refund_max
}

public_path(path) if {
	some prefix in data.envoy.authz.public_paths
	array.slice(path, 0, count(prefix)) == prefix
}

role := data.envoy.authz.tokens[bearer_token]

bearer_token := token if {
	value := input.attributes.request.http.headers.authorization
	startswith(value, "Bearer ")
	token := substring(value, count("Bearer "), -1)
}
