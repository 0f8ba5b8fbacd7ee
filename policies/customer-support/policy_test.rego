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
	r := warden.verdict(_call("update_email", {"customer_id": "C-42", "email": "new@example.com"}), {})
	r.effect == "require_approval"
	r.reason == "changing a customer's email address needs a support lead's approval"
	r.redact == ["action.arguments.email"]
	_effect(_call("update_phone", {"customer_id": "C-42", "phone": "+1 555 0100"}), {}) == "require_approval"
}
