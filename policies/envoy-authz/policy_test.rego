# Tests for the ext_authz example; run with `warden policy test policies/envoy-authz`.
#
# Inputs are given one key at a time (`with input.attributes as ...`): this
# engine cannot run builtins under `with input as {...}` (the whole input).
package envoy.authz_test

import rego.v1

import data.envoy.authz

_http(method, path, headers) := {"request": {"http": {"method": method, "path": path, "headers": headers}}}

_reader := {"authorization": "Bearer reader-token-example"}

_support := {"authorization": "Bearer support-token-example"}

test_public_health_is_open if {
	result := authz.allow with input.attributes as _http("GET", "/health", {})
		with input.parsed_path as ["health"]
	result.allowed
	result.headers["x-user-role"] == "anonymous"
}

test_reader_may_read if {
	result := authz.allow with input.attributes as _http("GET", "/orders/A-1", _reader)
		with input.parsed_path as ["orders", "A-1"]
	result.allowed
	result.dynamic_metadata.role == "reader"
	"x-debug-override" in result.request_headers_to_remove
}

test_missing_token_is_401 if {
	result := authz.allow with input.attributes as _http("GET", "/orders/A-1", {})
		with input.parsed_path as ["orders", "A-1"]
	not result.allowed
	result.http_status == 401
	result.headers["www-authenticate"] == "Bearer"
}

test_unknown_token_is_401 if {
	result := authz.allow with input.attributes as _http("GET", "/orders/A-1", {"authorization": "Bearer nope"})
		with input.parsed_path as ["orders", "A-1"]
	result.http_status == 401
}

test_reader_may_not_refund if {
	result := authz.allow with input.attributes as _http("POST", "/orders/A-1/refunds", _reader)
		with input.parsed_path as ["orders", "A-1", "refunds"]
		with input.action as {"kind": "tool_call", "tool": "issue_refund", "arguments": {"order_id": "A-1", "amount": 20}}
	not result.allowed
	result.http_status == 403
}

test_support_may_refund_up_to_the_limit if {
	result := authz.allow with input.attributes as _http("POST", "/orders/A-1/refunds", _support)
		with input.parsed_path as ["orders", "A-1", "refunds"]
		with input.action as {"kind": "tool_call", "tool": "issue_refund", "arguments": {"order_id": "A-1", "amount": 100}}
	result.allowed
}

test_support_may_not_refund_past_the_limit if {
	result := authz.allow with input.attributes as _http("POST", "/orders/A-1/refunds", _support)
		with input.parsed_path as ["orders", "A-1", "refunds"]
		with input.action as {"kind": "tool_call", "tool": "issue_refund", "arguments": {"order_id": "A-1", "amount": 101}}
	not result.allowed
	result.http_status == 403
}

test_unmapped_post_is_denied if {
	result := authz.allow with input.attributes as _http("POST", "/orders/A-1/notes", _support)
		with input.parsed_path as ["orders", "A-1", "notes"]
		with input.action as {"kind": "http_call", "tool": null, "arguments": null}
	not result.allowed
}
