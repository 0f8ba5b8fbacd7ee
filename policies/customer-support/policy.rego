# Customer-support policy: what a support agent may do through its tools.
#
# Every action gets exactly one decision from one chain of `else` branches,
# the most common case first: the engine has no rule indexing, so a branch
# that is never reached costs nothing. The tool catalogue, argument types and
# money limits live in data.json, where a support lead can review them.
#
# Daily totals come from input.budget; a missing counter counts as 0:
#   input.budget.<counter>.day.agent.{spent,reserved}     this agent today
#   input.budget.<counter>.day.customer.{spent,reserved}  this customer today
# (reserved: other refunds in flight, not yet settled).
# where <counter> is limits.<tool>.budget in data.json ("refunds", "credits").
package warden

import rego.v1

# The decision for `input`; see docs/policies.md for the result object.
# The logic is one function of the action and the budget, so tests can call it
# with literal values (this engine cannot run builtins under `with input as`).
# The `else` covers inputs without a budget document: nothing spent yet. (A
# budget that is not an object makes refunds and credits unreadable: denied.)
decision := verdict(input.action, input.budget) if {
	true
} else := verdict(input.action, {}) if {
	not input.budget
}

verdict(action, budget) := tool_verdict(action.tool, entry, action.arguments, budget) if {
	entry := data.warden.tools[action.tool]
	is_object(action.arguments)
} else := _allow("model calls are allowed; the tool calls they propose are checked one by one") if {
	action.kind == "llm_call"
} else := _deny(sprintf("%v actions without a tool name are not allowed for support agents", [action.kind])) if {
	not is_string(action.tool)
} else := _deny(sprintf("the call to %v carries no arguments object, so it cannot be checked", [action.tool])) if {
	not is_object(action.arguments)
} else := _deny(sprintf("%v looks like a bulk export of customer data, which support agents may never do", [action.tool])) if {
	some prefix in data.warden.bulk_export_prefixes
	startswith(action.tool, prefix)
} else := _deny(sprintf("%v is not in the customer-support tool catalogue, so it is denied; ask the platform team to review it and add it", [action.tool]))

# A catalogued tool whose arguments do not match data.json is denied before
# its class rules run. The cheap `every` check keeps well-formed calls fast;
# the sentences are only built when it fails.
tool_verdict(tool, entry, args, budget) := _deny(concat("; ", problems)) if {
	spec := entry.args
	not _arguments_ok(spec, args)
	problems := argument_problems(tool, spec, args)
	count(problems) > 0
} else := class_verdict(entry.class, tool, entry, args, budget)

_arguments_ok(spec, args) if {
	every name, want in spec {
		type_name(args[name]) == want
	}
}

# What is wrong with `args` against `spec` (name to type), as sentences.
argument_problems(tool, spec, args) := sort([msg |
	# `some name, want in spec` does not parse inside a comprehension on this engine
	some name
	want := spec[name]
	msg := _argument_problem(tool, name, want, object.get(args, name, null))
])

_argument_problem(tool, name, _, null) := sprintf("%v needs the argument %v, which is missing", [tool, name])

_argument_problem(tool, name, want, value) := sprintf("%v needs %v to be %v, but it is %v", [tool, name, _type_words[want], _type_words[type_name(value)]]) if {
	value != null
	want != "any"
	type_name(value) != want
}

_type_words := {
	"string": "text",
	"number": "a number",
	"boolean": "true or false",
	"array": "a list",
	"object": "an object",
	"set": "a set",
	"null": "empty",
}

class_verdict("read_only", _, _, _, _) := _allow("read-only tools are allowed: they only look up support data")

class_verdict("draft", _, _, _, _) := _allow("drafting a reply is allowed: nothing reaches the customer until it is sent")

class_verdict("money", tool, _, args, budget) := money_verdict(
	lim,
	args.amount,
	object.get(args, "currency", data.warden.currency),
	_used(budget, lim.budget, "agent"),
	_used(budget, lim.budget, "customer"),
) if {
	lim := data.warden.limits[tool]
}

class_verdict("account_closure", _, _, _, _) := _hold("closing a customer account always needs a support lead's approval")

class_verdict("personal_data", _, entry, _, _) := object.union(
	_hold(sprintf("changing a customer's %v needs a support lead's approval", [entry.what])),
	{"redact": object.get(entry, "redact", [])},
)

class_verdict("bulk_export", tool, _, _, _) := _deny(sprintf("%v exports customer data in bulk, which support agents may never do", [tool]))

# Refunds and credits. `agent` and `customer` are what was already paid out
# today. The first branch is the common case (within every limit); the rest
# find the reason, denials before approvals. Data must keep auto <= ceiling.
money_verdict(lim, amount, currency, agent, customer) := _allow(sprintf("a %v of %.2f %v is within this agent's limits", [lim.noun, amount, currency])) if {
	amount > 0
	currency == data.warden.currency
	amount <= lim.auto
	agent + amount <= lim.agent_day_auto
	customer + amount <= lim.customer_day_auto
} else := _deny(sprintf("a %v must be more than 0; this one is %v", [lim.noun, amount])) if {
	amount <= 0
} else := _deny(sprintf("a %v can only be issued in %v; this one is in %v", [lim.noun, data.warden.currency, currency])) if {
	currency != data.warden.currency
} else := _deny(sprintf("today's %v totals are not numbers, so the daily limits cannot be checked; ask the platform team", [lim.noun])) if {
	not _numbers(agent, customer)
} else := _deny(sprintf("a %v of %v is above the hard ceiling of %v for one %v; an agent cannot issue it, even with approval", [lim.noun, _money(amount), _money(lim.ceiling), lim.noun])) if {
	amount > lim.ceiling
} else := _deny(sprintf("this agent has issued %v in %vs today; another %v would pass its hard daily ceiling of %v", [_money(agent), lim.noun, _money(amount), _money(lim.agent_day_ceiling)])) if {
	agent + amount > lim.agent_day_ceiling
} else := _hold(sprintf("a %v of %v is above the %v an agent may issue without approval", [lim.noun, _money(amount), _money(lim.auto)])) if {
	amount > lim.auto
} else := _hold(sprintf("this agent has issued %v in %vs today; another %v would pass the %v it may issue per day without approval", [_money(agent), lim.noun, _money(amount), _money(lim.agent_day_auto)])) if {
	agent + amount > lim.agent_day_auto
} else := _hold(sprintf("this customer has received %v in %vs today; another %v would pass the %v a customer may receive per day without approval", [_money(customer), lim.noun, _money(amount), _money(lim.customer_day_auto)])) if {
	customer + amount > lim.customer_day_auto
} else := _deny(sprintf("the %v limits in data.json are incomplete, so this %v cannot be checked; ask the platform team", [lim.noun, lim.noun]))

# Paid out today plus what other actions in flight have reserved: without the
# reservations, concurrent refunds could each pass a daily limit on their own.
_used(budget, counter, who) := spent + reserved if {
	spent := object.get(budget, [counter, "day", who, "spent"], 0)
	reserved := object.get(budget, [counter, "day", who, "reserved"], 0)
	is_number(spent)
	is_number(reserved)
} else := "not a number"

_numbers(a, b) if {
	is_number(a)
	is_number(b)
}

_money(amount) := sprintf("%.2f %v", [amount, data.warden.currency])

_allow(reason) := {"effect": "allow", "reason": reason}

_deny(reason) := {"effect": "deny", "reason": reason}

_hold(reason) := {
	"effect": "require_approval",
	"reason": reason,
	"approvers": data.warden.approvals.approvers,
	"hold_timeout_s": data.warden.approvals.hold_timeout_s,
}
