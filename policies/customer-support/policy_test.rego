# Unit tests for policy.rego; run with `warden policy test policies/customer-support`.
#
# Most tests call `verdict(action, budget)` with literal values. The tests of
# `decision` itself override input one key at a time (`with input.action as`):
# this engine cannot run builtins under `with input as {...}` (the whole input).
# `with data.warden.<key> as` tries other limits. The decision tables in
# decisions/ check the same rules on the production path.
package warden.tests

import rego.v1

import data.warden

# A string literal passed straight as a function argument keeps its quotes in
# sprintf on this engine, so tools whose name appears in a reason that a test
# compares exactly are written inside object literals.
_call(tool, args) := {"kind": "tool_call", "tool": tool, "arguments": args, "protocol": "openai.chat", "stage": "proposed"}

_refund(amount) := {"kind": "tool_call", "tool": "issue_refund", "arguments": {"order_id": "A-1001", "amount": amount}}

_credit(amount) := {"kind": "tool_call", "tool": "apply_credit", "arguments": {"customer_id": "C-42", "amount": amount}}

_spent(counter, agent, customer) := {counter: {"day": {"agent": {"spent": agent}, "customer": {"spent": customer}}}}

_effect(action, budget) := warden.verdict(action, budget).effect

_reason(action, budget) := warden.verdict(action, budget).reason

# --- the decision rule -------------------------------------------------------

test_decision_reads_action_and_budget if {
	d := warden.decision with input.action as _refund(50)
		with input.budget as _spent("refunds", 280, 0)
	d.effect == "require_approval"
}

test_decision_without_budget_counts_nothing_spent if {
	d := warden.decision with input.action as _refund(50)
	d.effect == "allow"
}

# --- kinds of action -------------------------------------------------------

test_llm_call_allowed if {
	_effect({"kind": "llm_call", "tool": null, "arguments": null}, {}) == "allow"
}

test_http_call_without_tool_denied if {
	_effect({"kind": "http_call", "tool": null, "arguments": null}, {}) == "deny"
	contains(_reason({"kind": "http_call", "tool": null, "arguments": null}, {}), "without a tool name")
}

test_tool_call_without_arguments_object_denied if {
	_effect({"kind": "tool_call", "tool": "get_order", "arguments": null}, {}) == "deny"
	contains(_reason({"kind": "tool_call", "tool": "get_order", "arguments": null}, {}), "no arguments object")
}

# --- the catalogue -----------------------------------------------------------

test_read_only_tools_allowed if {
	every tool in ["search_kb", "get_ticket", "get_order", "get_customer", "list_orders"] {
		_effect(_call(tool, {}), {}) == "allow"
	}
}

test_every_read_only_tool_in_data_is_allowed if {
	every tool, entry in data.warden.tools {
		_read_only_allowed(tool, entry)
	}
}

_read_only_allowed(_, entry) if entry.class != "read_only"

_read_only_allowed(tool, entry) if {
	entry.class == "read_only"
	_effect(_call(tool, {}), {}) == "allow"
}

test_draft_reply_allowed if {
	_effect(_call("draft_reply", {"ticket_id": "T-1", "body": "Hello"}), {}) == "allow"
}

test_unknown_tool_denied if {
	_effect(_call("delete_database", {}), {}) == "deny"
	contains(_reason(_call("delete_database", {}), {}), "not in the customer-support tool catalogue")
}

test_bulk_export_tools_denied if {
	every tool in ["export_customers", "bulk_export"] {
		contains(_reason(_call(tool, {}), {}), "exports customer data in bulk")
		_effect(_call(tool, {}), {}) == "deny"
	}
}

test_uncatalogued_export_denied_as_bulk_export if {
	_effect(_call("export_invoices", {}), {}) == "deny"
	contains(_reason(_call("export_invoices", {}), {}), "bulk export")
}

# --- arguments ---------------------------------------------------------------

test_missing_argument_denied if {
	r := warden.verdict({"kind": "tool_call", "tool": "issue_refund", "arguments": {"amount": 20}}, {})
	r.effect == "deny"
	r.reason == "issue_refund needs the argument order_id, which is missing"
}

test_amount_of_wrong_type_denied if {
	r := warden.verdict(_refund("20"), {})
	r.effect == "deny"
	r.reason == "issue_refund needs amount to be a number, but it is text"
}

test_all_argument_problems_reported if {
	r := warden.verdict(_call("apply_credit", {"amount": true}), {})
	r.effect == "deny"
	contains(r.reason, "needs amount to be a number, but it is true or false")
	contains(r.reason, "needs the argument customer_id, which is missing")
}

test_argument_of_any_type_only_needs_to_be_present if {
	_effect(_call("update_address", {"customer_id": "C-42", "address": {"city": "Lyon"}}), {}) == "require_approval"
	_effect(_call("update_address", {"customer_id": "C-42", "address": "1 Main St"}), {}) == "require_approval"
	_effect(_call("update_address", {"customer_id": "C-42"}), {}) == "deny"
}

test_argument_problems_empty_when_fine if {
	warden.argument_problems("x", {"a": "string", "b": "number"}, {"a": "s", "b": 1}) == []
}

# --- refunds and credits -----------------------------------------------------

test_small_refund_allowed if {
	r := warden.verdict(_refund(40), {})
	r.effect == "allow"
	r.reason == "a refund of 40.00 USD is within this agent's limits"
}

test_refund_at_the_auto_limit_allowed if {
	_effect(_refund(100), {}) == "allow"
}

test_refund_above_auto_limit_needs_approval if {
	r := warden.verdict(_refund(250), {})
	r.effect == "require_approval"
	r.approvers == ["support-leads"]
	r.hold_timeout_s == 3600
	contains(r.reason, "above the 100.00 USD an agent may issue without approval")
}

test_refund_above_ceiling_denied if {
	r := warden.verdict(_refund(1000.01), {})
	r.effect == "deny"
	contains(r.reason, "hard ceiling of 1000.00 USD")
}

test_zero_or_negative_refund_denied if {
	_effect(_refund(0), {}) == "deny"
	contains(_reason(_refund(-5), {}), "must be more than 0")
}

test_refund_in_other_currency_denied if {
	action := _call("issue_refund", {"order_id": "A-1", "amount": 10, "currency": "EUR"})
	_effect(action, {}) == "deny"
	contains(_reason(action, {}), "can only be issued in USD; this one is in EUR")
}

test_refund_in_usd_explicitly_allowed if {
	_effect(_call("issue_refund", {"order_id": "A-1", "amount": 10, "currency": "USD"}), {}) == "allow"
}

test_agent_daily_total_needs_approval if {
	r := warden.verdict(_refund(50), _spent("refunds", 280, 0))
	r.effect == "require_approval"
	contains(r.reason, "this agent has issued 280.00 USD in refunds today")
}

test_customer_daily_total_needs_approval if {
	r := warden.verdict(_refund(50), _spent("refunds", 0, 120))
	r.effect == "require_approval"
	contains(r.reason, "this customer has received 120.00 USD in refunds today")
}

test_agent_daily_ceiling_denied if {
	r := warden.verdict(_refund(50), _spent("refunds", 1990, 0))
	r.effect == "deny"
	contains(r.reason, "hard daily ceiling of 2000.00 USD")
}

test_unreadable_budget_denied if {
	contains(_reason(_refund(50), _spent("refunds", "a lot", 0)), "totals are not numbers")
	_effect(_refund(50), _spent("refunds", 0, null)) == "deny"
}

test_refund_counters_do_not_limit_credits if {
	_effect(_credit(20), _spent("refunds", 1990, 1990)) == "allow"
}

test_credit_limits_apply if {
	_effect(_credit(20), {}) == "allow"
	_effect(_credit(60), {}) == "require_approval"
	_effect(_credit(501), {}) == "deny"
	_effect(_credit(20), _spent("credits", 190, 0)) == "require_approval"
	_effect(_credit(20), _spent("credits", 0, 60)) == "require_approval"
}

test_limits_come_from_data if {
	limits := {"issue_refund": {
		"noun": "refund", "budget": "refunds", "auto": 10, "ceiling": 20,
		"agent_day_auto": 100, "agent_day_ceiling": 200, "customer_day_auto": 100,
	}}
	_effect(_refund(15), {}) == "require_approval" with data.warden.limits as limits
	_effect(_refund(25), {}) == "deny" with data.warden.limits as limits
}

test_incomplete_limits_denied if {
	limits := {"issue_refund": {"noun": "refund", "budget": "refunds"}}
	r := warden.verdict(_refund(5), {}) with data.warden.limits as limits
	r.effect == "deny"
	contains(r.reason, "limits in data.json are incomplete")
}

# --- account actions ---------------------------------------------------------

test_close_account_needs_approval if {
	r := warden.verdict(_call("close_account", {"customer_id": "C-42"}), {})
	r.effect == "require_approval"
	r.approvers == ["support-leads"]
	r.reason == "closing a customer account always needs a support lead's approval"
}

test_personal_data_changes_need_approval_and_are_redacted if {
	r := warden.decision with input.action as _call("update_email", {"customer_id": "C-42", "email": "new@example.com"})
	r.effect == "require_approval"
	r.reason == "changing a customer's email address needs a support lead's approval"
	r.redact == ["action.arguments.email", "action.input_responses"]
	_effect(_call("update_phone", {"customer_id": "C-42", "phone": "+1 555 0100"}), {}) == "require_approval"
}

# A denied call is recorded too: the new value is masked whatever the verdict,
# and a customer id of the wrong type (which could hold anything) with it.
test_personal_data_changes_denied_for_their_types_are_redacted if {
	phone := warden.decision with input.action as _call("update_phone", {"customer_id": "C-42", "phone": 4915112345678})
	phone.effect == "deny"
	contains(phone.reason, "needs phone to be text, but it is a number")
	phone.redact == ["action.arguments.phone", "action.input_responses"]
	email := warden.decision with input.action as _call("update_email", {"customer_id": 1042, "email": ["ann@example.com"]})
	email.effect == "deny"
	email.redact == ["action.arguments.customer_id", "action.arguments.email", "action.input_responses"]
	address := warden.decision with input.action as _call("update_address", {"customer_id": 7, "address": {"street": "1 Main St"}})
	address.effect == "deny"
	address.redact == ["action.arguments.address", "action.arguments.customer_id", "action.input_responses"]
}

# Only what data.json keeps in clear stays: an argument of another name is
# masked too, and one `args` does not name masks all of them (its path would
# spell its name, and a name can be an email address).
test_only_the_customer_id_of_a_personal_data_change_stays_in_clear if {
	extra := warden.decision with input.action as _call("update_email", {"customer_id": "C-42", "email": "a@example.com", "new_email": "b@example.com"})
	extra.effect == "require_approval"
	extra.redact == ["action.arguments", "action.input_responses"]
	spelled := warden.decision with input.action as _call("update_email", {"customer_id": "C-42", "Email": "a@example.com"})
	spelled.effect == "deny"
	spelled.redact == ["action.arguments", "action.input_responses"]
	keyed := warden.decision with input.action as _call("update_phone", {"customer_id": "C-42", "phone": "+1 555 0100", "ann@example.com": true})
	keyed.redact == ["action.arguments", "action.input_responses"]
	bare := warden.decision with input.action as _call("update_address", {"customer_id": "C-42"})
	bare.effect == "deny"
	bare.redact == ["action.input_responses"]
}

# Written out per tool, not as a function called for each: a `with` inside a
# function makes the engine's compilation of this module many times slower.
test_every_decision_about_a_redacting_tool_carries_its_list if {
	{tool | some tool; data.warden.tools[tool].redact} == {"update_email", "update_phone", "update_address"}
	email := warden.decision with input.action as _call("update_email", {"customer_id": true})
	email.effect == "deny"
	email.redact == ["action.arguments.customer_id", "action.input_responses"]
	phone := warden.decision with input.action as _call("update_phone", {"customer_id": true})
	phone.effect == "deny"
	phone.redact == ["action.arguments.customer_id", "action.input_responses"]
	address := warden.decision with input.action as _call("update_address", {"customer_id": true})
	address.effect == "deny"
	address.redact == ["action.arguments.customer_id", "action.input_responses"]
	no_args := warden.decision with input.action as {"kind": "tool_call", "tool": "update_email", "arguments": "text", "stage": "proposed"}
	no_args.effect == "deny"
	no_args.redact == ["action.arguments", "action.input_responses"]
}

# The answers may carry the new value itself: they are masked whole.
test_answers_that_deny_a_personal_data_change_keep_it_redacted if {
	retry := object.union(
		_call("update_email", {"customer_id": "C-42", "email": "new@example.com"}),
		{"stage": "executed", "input_responses": {"e": {"action": "accept", "content": {"email": "other@example.com"}}}},
	)
	d := warden.decision with input.action as retry
	d.effect == "deny"
	contains(d.reason, "carry email")
	d.redact == ["action.arguments.email", "action.input_responses"]
}

test_a_session_denial_keeps_the_tools_redactions if {
	change := {"kind": "tool_call", "tool": "update_phone", "arguments": {"customer_id": "C-1", "phone": "+1 555 0100"}}
	held := {"effect": "require_approval", "reason": "needs a lead"}
	warden.with_session(held, change, [], _session({"held": {"update_email": 2}})).effect == "deny"
	d := warden.decision with input.action as change with input.history as [] with input.session as _session({"held": {"update_email": 2}})
	d.effect == "deny"
	d.redact == ["action.arguments.phone", "action.input_responses"]
}

# An MCP tools/list answer names the tool only: its answers are still masked.
test_a_listed_personal_data_tool_has_no_arguments_to_mask if {
	listed := {"kind": "tool_call", "tool": "update_email", "stage": "list", "arguments": null}
	d := warden.decision with input.action as listed
	d.redact == ["action.input_responses"]
}

test_tools_without_a_redact_list_get_none if {
	d := warden.decision with input.action as _call("fetch_url", {"url": "https://example.com"})
	d.effect == "allow"
	not d.redact
}

# --- MCP tools/list (stage "list"): only the tool's name is known -----------

_listed(tool) := {"kind": "tool_call", "tool": tool, "arguments": null, "protocol": "mcp", "stage": "list"}

test_listing_keeps_every_catalogued_tool_but_bulk_exports if {
	every tool, entry in data.warden.tools {
		_listed_as_catalogued(tool, entry)
	}
}

_listed_as_catalogued(tool, entry) if {
	entry.class == "bulk_export"
	_effect(_listed(tool), {}) == "deny"
}

_listed_as_catalogued(tool, entry) if {
	entry.class != "bulk_export"
	_effect(_listed(tool), {}) == "allow"
}

test_listing_keeps_tools_whose_calls_depend_on_arguments if {
	# A refund may be allowed, held or denied depending on the amount: it stays listed.
	r := warden.verdict(_listed("issue_refund"), {})
	r.effect == "allow"
	contains(r.reason, "each call is checked with its arguments")
	_effect(_listed("close_account"), {}) == "allow"
}

test_listing_hides_unknown_tools_and_bulk_exports if {
	contains(_reason(_listed("delete_database"), {}), "not in the customer-support tool catalogue")
	_effect(_listed("delete_database"), {}) == "deny"
	contains(_reason(_listed("dump_everything"), {}), "bulk export")
	_effect(_listed("dump_everything"), {}) == "deny"
}

test_listing_through_the_decision_rule if {
	d := warden.decision with input.action as _listed("search_kb")
	d.effect == "allow"
}

# --- hosted MCP servers a model request declares (input.request.tools) ------

_kb := "https://kb.support.example.com/mcp"

_hosted(label, url, allowed) := {"type": "mcp", "name": label, "server_label": label, "server_url": url, "allowed_tools": allowed}

test_request_without_hosted_mcp_allowed if {
	warden.llm_verdict([]).effect == "allow"
	warden.llm_verdict([{"type": "function", "name": "get_order"}]).effect == "allow"
}

test_approved_hosted_mcp_server_with_approved_tools_allowed if {
	warden.llm_verdict([_hosted("kb", _kb, ["search_kb"])]).effect == "allow"
}

test_unapproved_hosted_mcp_server_denied if {
	r := warden.llm_verdict([_hosted("github", "https://mcp.github.example/mcp", null)])
	r.effect == "deny"
	contains(r.reason, "MCP server github (https://mcp.github.example/mcp), which is not approved")
}

test_hosted_mcp_connector_denied if {
	r := warden.llm_verdict([{"type": "mcp", "name": "mail", "connector_id": "connector_gmail"}])
	r.effect == "deny"
	contains(r.reason, "(connector connector_gmail)")
}

test_approved_server_must_restrict_its_tools if {
	r := warden.llm_verdict([_hosted("kb", _kb, null)])
	r.effect == "deny"
	contains(r.reason, "any tool of the MCP server kb, but only search_kb, get_article are approved")
}

test_approved_server_with_other_tools_denied if {
	r := warden.llm_verdict([_hosted("kb", _kb, ["search_kb", "delete_article"])])
	r.effect == "deny"
	contains(r.reason, "call delete_article on the MCP server kb")
}

test_every_hosted_mcp_problem_reported if {
	r := warden.llm_verdict([_hosted("kb", _kb, null), _hosted("x", "https://x.example/mcp", [])])
	contains(r.reason, "any tool of the MCP server kb")
	contains(r.reason, "MCP server x (https://x.example/mcp)")
}

# (`with input.action as` takes a literal or a function's result here, not a constant rule.)
test_hosted_mcp_through_the_decision_rule if {
	denied := warden.decision with input.action as {"kind": "llm_call", "tool": null, "arguments": null}
		with input.request as {"tools": [_hosted("gh", "https://mcp.github.example/mcp", null)]}
	denied.effect == "deny"
	allowed := warden.decision with input.action as {"kind": "llm_call", "tool": null, "arguments": null}
		with input.request as {"tools": [_hosted("kb", _kb, ["search_kb"])]}
	allowed.effect == "allow"
	plain := warden.decision with input.action as {"kind": "llm_call", "tool": null, "arguments": null}
	plain.effect == "allow"
}

# --- stored prompts a model request uses (input.request.tools, type "prompt") ---

_prompt(id, version) := {"type": "prompt", "name": null, "id": id, "version": version}

test_unapproved_stored_prompt_denied if {
	r := warden.llm_verdict([_prompt("pmpt_123", "2")])
	r.effect == "deny"
	contains(r.reason, "the stored prompt pmpt_123, which is not approved for support agents")
}

test_stored_prompt_without_an_id_denied if {
	r := warden.llm_verdict([_prompt(null, null)]) with data.warden.stored_prompts as {"pmpt_ok": {}}
	r.effect == "deny"
	contains(r.reason, "the stored prompt without an id")
}

test_approved_stored_prompt_allowed if {
	prompts := {"pmpt_ok": {}, "pmpt_pinned": {"versions": ["2", "3"]}}
	warden.llm_verdict([_prompt("pmpt_ok", null)]).effect == "allow" with data.warden.stored_prompts as prompts
	warden.llm_verdict([_prompt("pmpt_pinned", "3")]).effect == "allow" with data.warden.stored_prompts as prompts
}

test_stored_prompt_version_must_be_listed if {
	prompts := {"pmpt_pinned": {"versions": ["2"]}}
	other := warden.llm_verdict([_prompt("pmpt_pinned", "4")]) with data.warden.stored_prompts as prompts
	other.effect == "deny"
	contains(other.reason, "uses version 4 of the stored prompt pmpt_pinned, whose approved versions are 2;")
	latest := warden.llm_verdict([_prompt("pmpt_pinned", null)]) with data.warden.stored_prompts as prompts
	latest.effect == "deny"
	contains(latest.reason, "uses the latest version of the stored prompt pmpt_pinned")
}

test_stored_prompt_and_hosted_mcp_problems_reported_together if {
	r := warden.llm_verdict([_prompt("pmpt_123", null), _hosted("gh", "https://mcp.github.example/mcp", null)])
	contains(r.reason, "the stored prompt pmpt_123")
	contains(r.reason, "MCP server gh (https://mcp.github.example/mcp)")
}

test_stored_prompt_through_the_decision_rule if {
	denied := warden.decision with input.action as {"kind": "llm_call", "tool": null, "arguments": null}
		with input.request as {"tools": [_prompt("pmpt_123", "2")]}
	denied.effect == "deny"
	contains(denied.reason, "stored prompt pmpt_123")
}

test_unreadable_mcp_url_denied if {
	# declared_tools shows a URL whose host parsers disagree on (user info, a backslash) as null.
	r := warden.llm_verdict([_hosted("kb", null, ["search_kb"])])
	r.effect == "deny"
	contains(r.reason, "MCP server kb (no URL Warden can check), which is not approved")
}

# --- session rules (input.history, input.session) ----------------------------

_sink := {"kind": "tool_call", "tool": "send_email", "arguments": {"to": "a@example.com"}, "labels": ["sensitive_sink"]}

_ok := {"effect": "allow", "reason": "fine"}

_session(extra) := object.union({"conversation": true, "calls": {}, "held": {}, "taints": []}, extra)

_prior(tool, order, verified) := {"call_id": "call_1", "tool": tool, "arguments": {"order_id": order}, "verified": verified}

test_sink_after_untrusted_output_is_held if {
	d := warden.with_session(_ok, _sink, [], _session({"taints": ["untrusted_output"]}))
	d.effect == "require_approval"
	contains(d.reason, "prompt injection")
	d.approvers == ["support-leads"]
}

test_sink_in_a_conversation_cut_by_the_bounds_is_held if {
	d := warden.with_session(_ok, _sink, [], _session({"truncated": true}))
	d.effect == "require_approval"
	contains(d.reason, "longer than Warden reads")
}

test_sink_while_the_sessions_counters_cannot_be_read_is_held if {
	d := warden.with_session(_ok, _sink, [], _session({"available": false}))
	d.effect == "require_approval"
	contains(d.reason, "cannot be read now")
}

test_sink_without_taint_keeps_its_verdict if {
	warden.with_session(_ok, _sink, [], _session({})) == _ok
}

test_untrusted_output_alone_holds_nothing if {
	fetch := {"kind": "tool_call", "tool": "fetch_url", "arguments": {"url": "https://example.com"}, "labels": ["untrusted_output"]}
	warden.with_session(_ok, fetch, [], _session({"taints": ["untrusted_output"]})) == _ok
}

test_session_rules_never_loosen_a_denial if {
	denied := {"effect": "deny", "reason": "no"}
	warden.with_session(denied, _sink, [], _session({"taints": ["untrusted_output"]})) == denied
}

test_third_account_change_in_a_session_is_denied if {
	change := {"kind": "tool_call", "tool": "update_email", "arguments": {"customer_id": "C-1", "email": "x@example.com"}}
	held := {"effect": "require_approval", "reason": "needs a lead"}
	d := warden.with_session(held, change, [], _session({"held": {"update_email": 1}, "calls": {"close_account": 1}}))
	d.effect == "deny"
	contains(d.reason, "at most 2")
}

test_second_account_change_keeps_its_hold if {
	change := {"kind": "tool_call", "tool": "update_phone", "arguments": {"customer_id": "C-1", "phone": "1"}}
	held := {"effect": "require_approval", "reason": "needs a lead"}
	warden.with_session(held, change, [], _session({"held": {"update_email": 1}})) == held
}

test_refund_for_an_order_looked_up_passes if {
	history := [_prior("get_order", "A-1001", true)]
	d := warden.with_session(_ok, _refund(50), history, _session({})) with data.warden.sessions.refund_needs_lookup as true
	d == _ok
}

test_refund_for_an_order_found_by_search_passes if {
	history := [{"call_id": "c", "tool": "search_kb", "arguments": {"query": "status of A-1001"}, "verified": true}]
	d := warden.with_session(_ok, _refund(50), history, _session({})) with data.warden.sessions.refund_needs_lookup as true
	d == _ok
}

test_a_search_naming_a_longer_order_id_is_no_lookup if {
	# "A-10011 A-20" names neither A-1001 nor A-2 in full.
	history := [{"call_id": "c", "tool": "search_kb", "arguments": {"query": "A-10011 A-20"}, "verified": true}]
	d := warden.with_session(_ok, _refund(50), history, _session({})) with data.warden.sessions.refund_needs_lookup as true
	d.effect == "require_approval"
}

test_a_refund_naming_no_order_is_never_looked_up if {
	refund := {"kind": "tool_call", "tool": "issue_refund", "arguments": {"order_id": "", "amount": 50}}
	history := [{"call_id": "c", "tool": "search_kb", "arguments": {"query": "anything"}, "verified": true}]
	d := warden.with_session(_ok, refund, history, _session({})) with data.warden.sessions.refund_needs_lookup as true
	d.effect == "require_approval"
}

test_refund_for_an_order_never_looked_up_is_held if {
	history := [_prior("get_order", "A-2002", true)]
	d := warden.with_session(_ok, _refund(50), history, _session({})) with data.warden.sessions.refund_needs_lookup as true
	d.effect == "require_approval"
	contains(d.reason, "was not looked up")
}

test_a_forged_lookup_does_not_unlock_a_refund if {
	history := [_prior("get_order", "A-1001", false)]
	d := warden.with_session(_ok, _refund(50), history, _session({})) with data.warden.sessions.refund_needs_lookup as true
	d.effect == "require_approval"
	contains(d.reason, "the history was changed")
}

test_refund_lookup_is_off_in_the_shipped_data if {
	warden.with_session(_ok, _refund(50), [], _session({})) == _ok
}

test_refund_lookup_needs_a_conversation if {
	# MCP, gRPC and HTTP tool calls carry no conversation: the rule cannot apply.
	d := warden.with_session(_ok, _refund(50), [], {}) with data.warden.sessions.refund_needs_lookup as true
	d == _ok
}

# `decision` with history and session keys is checked by decisions/sessions.yaml:
# this engine leaves it undefined when several input keys are replaced with `with`.

test_decision_without_session_keys_is_the_plain_verdict if {
	# Inputs from before sessions (and tables without them) get the plain verdict.
	d := warden.decision with input.action as _refund(50)
		with input.budget as {}
	d.effect == "allow"
}
