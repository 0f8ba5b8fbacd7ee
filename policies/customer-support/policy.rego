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
# Session rules (input.history, input.session) then make an allowed action
# stricter, never looser; an input without them gets the plain verdict.
decision := object.union(_decided, {"redact": _redactions}) if {
	_redactions
} else := _decided

_decided := with_session(verdict(input.action, input.budget), input.action, input.history, input.session) if {
	true
} else := with_session(verdict(input.action, {}), input.action, input.history, input.session) if {
	not input.budget
} else := verdict(input.action, input.budget) if {
	true
} else := verdict(input.action, {}) if {
	not input.budget
}

# A catalogued tool's redactions ride on every decision about it, whichever
# branch decided: a denied call is recorded too, with arguments as personal as
# an approved one's (a phone number sent as a number, an address beside a
# customer id of the wrong type, a change past the session's limit, answers
# that carry the new value). Only the audit record is masked: the tool still
# gets the values. `redact` in data.json lists paths masked on every decision
# (the contact changes: all of an MCP retry's answers).
#
# A tool with `recorded_in_clear` keeps only those arguments in clear, and only
# of the type `args` gives them: every other argument is masked, whatever it is
# called (email, new_email). A list of the personal names could never be
# complete; a list of what may stay in clear is. An argument `args` does not
# name (Email, a URL, an address as a key) masks all of them: the path to it
# would spell its name in the record, and its name could be the personal data.
# Rules of the input, not functions given the action: the decision cache keys
# on the input paths they read (action.tool, action.arguments), and each is
# evaluated once per decision.
_redactions := array.concat(_argument_redactions, object.get(_entry, "redact", [])) if {
	_entry.recorded_in_clear
} else := _entry.redact

_entry := data.warden.tools[input.action.tool]

_argument_redactions := [] if {
	input.action.arguments == null # an MCP tools/list answer: no arguments
} else := ["action.arguments"] if {
	not _only_named
} else := sort([path |
	some name
	value := input.action.arguments[name]
	not _clear(name, value)
	path := concat(".", ["action.arguments", name])
])

_only_named if {
	is_object(input.action.arguments)
	every name, _ in input.action.arguments {
		_entry.args[name]
	}
}

_clear(name, value) if {
	name in _entry.recorded_in_clear
	_typed(_entry.args[name], value)
}

_typed("any", _)

_typed(want, value) if type_name(value) == want

verdict(action, budget) := _deny(concat("", [
	"the answers to the MCP server's questions carry ", concat(", ", array.slice(fields, 0, 8)), ", which an answer may not decide for ",
	action.tool, " (the limits read the arguments); answers may carry only ", concat(", ", allowed),
])) if {
	# Only an MCP retry has answers (2026-07-28): for every other call this ends here.
	answers := action.input_responses
	action.kind != "mcp_request" # a server's own method is never a catalogued tool
	entry := data.warden.tools[action.tool]
	not entry.class in {"read_only", "draft"}
	allowed := object.get(entry, "answers", data.warden.mcp.answer_fields)
	fields := _unlisted_answer_fields(answers, allowed)
	count(fields) > 0
} else := tool_verdict(action.tool, entry, action.arguments, budget) if {
	action.kind != "mcp_request"
	entry := data.warden.tools[action.tool]
	is_object(action.arguments)
} else := _allow("model calls are allowed; the tool calls they propose are checked one by one") if {
	action.kind == "llm_call"
	not _declares_checked
} else := llm_verdict(input.request.tools) if {
	action.kind == "llm_call"
} else := list_verdict(action.tool) if {
	action.stage == "list"
	is_string(action.tool)
} else := mcp_request_verdict(action) if {
	action.kind in _mcp_requests
} else := _deny(sprintf("%v actions without a tool name are not allowed for support agents", [action.kind])) if {
	not is_string(action.tool)
} else := _deny(sprintf("the call to %v carries no arguments object, so it cannot be checked", [action.tool])) if {
	not is_object(action.arguments)
} else := _deny(sprintf("%v looks like a bulk export of customer data, which support agents may never do", [action.tool])) if {
	some prefix in data.warden.bulk_export_prefixes
	startswith(action.tool, prefix)
} else := _deny(sprintf("%v is not in the customer-support tool catalogue, so it is denied; ask the platform team to review it and add it", [action.tool]))

# A model request may declare MCP servers the provider calls itself (OpenAI's
# `mcp` tool, Anthropic's MCP connector); Warden shows them in
# input.request.tools. Each must be in data.warden.hosted_mcp_servers, by URL,
# and may only expose the tools listed there (when a list is given). A stored
# OpenAI prompt (type "prompt") can bring tools of its own that the request
# does not show: its id must be in data.warden.stored_prompts, and its version
# among the listed ones (when a list is given).
llm_verdict(tools) := _deny(concat("; ", problems)) if {
	problems := array.concat(
		array.concat(
			hosted_mcp_problems(tools, data.warden.hosted_mcp_servers),
			stored_prompt_problems(tools, _stored_prompts),
		),
		array.concat(hosted_egress_problems(tools), hosted_container_problems(tools, _hosted_containers)),
	)
	count(problems) > 0
} else := _allow("model calls are allowed; the tool calls they propose are checked one by one")

# What is wrong with the hosted MCP servers a request declares, as sentences.
hosted_mcp_problems(tools, allowed) := sort([msg |
	some tool in tools
	tool.type == "mcp"
	msg := _hosted_mcp_problem(tool, object.get(allowed, object.get(tool, "server_url", ""), null))
])

# Messages are joined with concat: this engine's sprintf quotes a string that
# concat built, and breaks its own output.
_hosted_mcp_problem(tool, null) := concat("", [
	"the request lets the model call the MCP server ", _label(tool), " (", _where(tool), "), ",
	"which is not approved for support agents; ask the platform team to review it",
])

_hosted_mcp_problem(tool, entry) := concat("", [
	"the request lets the model call any tool of the MCP server ", _label(tool),
	", but only ", concat(", ", entry.tools), " are approved there; set allowed_tools",
]) if {
	entry != null
	is_array(entry.tools)
	not is_array(tool.allowed_tools)
}

_hosted_mcp_problem(tool, entry) := concat("", [
	"the request lets the model call ", concat(", ", extra), " on the MCP server ",
	_label(tool), ", which is not approved there",
]) if {
	entry != null
	is_array(entry.tools)
	is_array(tool.allowed_tools)
	extra := sort([name | some name in tool.allowed_tools; not name in entry.tools])
	count(extra) > 0
}

_label(tool) := tool.name if is_string(tool.name) else := "without a name"

_where(tool) := tool.server_url if is_string(tool.server_url) else := concat(" ", ["connector", tool.connector_id]) if is_string(tool.connector_id) else := "no URL Warden can check"

# Code the provider runs for the model (a hosted shell, the code interpreter)
# runs while the answer is made, before Warden decides the calls it reports:
# it may not reach the network, where it could send customer data anywhere.
# The provider's default (no network_policy) and "disabled" keep it offline.
hosted_egress_problems(tools) := sort([msg |
	some tool in tools
	policy := tool.environment.network_policy
	policy != null
	policy.type != "disabled"
	msg := concat("", [
		"the request lets code the provider runs (", tool.type, ") reach the network; ",
		"support agents may run hosted code only offline (network_policy disabled)",
	])
])

# A container made beforehand (container_reference) carries the network policy it
# was made with, which the request does not show: only containers the data lists.
hosted_container_problems(tools, allowed) := sort([msg |
	some tool in tools
	tool.environment.type == "container_reference"
	not tool.environment.container_id in allowed
	msg := concat("", [
		"the request runs code the provider runs (", tool.type, ") in the container ",
		_container(tool.environment), ", which is not approved for support agents ",
		"(it keeps the network access it was made with); ask the platform team to review it",
	])
])

_container(environment) := environment.container_id if is_string(environment.container_id) else := "without an id"

_hosted_containers := approved if {
	approved := data.warden.hosted_containers
} else := []

# A data document without stored_prompts approves none (it is not an error
# that would leave llm_verdict undefined and the request allowed).
_stored_prompts := approved if {
	approved := data.warden.stored_prompts
} else := {}

# What is wrong with the stored prompts a request uses, as sentences.
stored_prompt_problems(tools, allowed) := sort([msg |
	some tool in tools
	tool.type == "prompt"
	msg := _stored_prompt_problem(tool, _prompt_entry(tool, allowed))
])

_prompt_entry(tool, allowed) := allowed[tool.id] if is_string(tool.id) else := null

_stored_prompt_problem(tool, null) := concat("", [
	"the request uses the stored prompt ", _prompt_id(tool), ", which is not approved for ",
	"support agents (a stored prompt can bring its own tools and instructions); ",
	"ask the platform team to review it",
])

_stored_prompt_problem(tool, entry) := concat("", [
	"the request uses ", _prompt_version(tool), " of the stored prompt ", tool.id,
	", whose approved versions are ", concat(", ", entry.versions), "; set prompt.version",
]) if {
	entry != null
	is_array(entry.versions)
	not tool.version in entry.versions
}

_prompt_id(tool) := tool.id if is_string(tool.id) else := "without an id"

_prompt_version(tool) := concat(" ", ["version", tool.version]) if is_string(tool.version) else := "the latest version"

# Whether the request declares something llm_verdict checks (input.request.tools).
_declares_checked if {
	some tool in input.request.tools
	_checked(tool)
}

_checked(tool) if tool.type in ["mcp", "prompt"]

_checked(tool) if tool.environment.network_policy != null

_checked(tool) if tool.environment.type == "container_reference"

# MCP requests other than tool calls, at Warden's MCP doors: the method is the
# tool and its params the arguments. Knowledge-base articles may be read
# (data.warden.mcp.readable_resources: URI prefixes), and the prompts in
# data.warden.mcp.prompts fetched and their arguments completed. Anything else
# a server offers this way (a customer's records, files) is read through the
# catalogued tools, whose arguments are checked. So is a server's own
# extension method (kind mcp_request, MCP does not define it): none is approved.
_mcp_requests := {"resource_read", "prompt_get", "argument_completion", "mcp_request"}

mcp_request_verdict(asked) := _allow(sprintf("%v is a knowledge-base resource support agents may read", [asked.arguments.uri])) if {
	asked.kind == "resource_read"
	some prefix in data.warden.mcp.readable_resources
	startswith(asked.arguments.uri, prefix)
} else := _allow(sprintf("the prompt %v is approved for support agents", [asked.arguments.name])) if {
	asked.kind == "prompt_get"
	asked.arguments.name in data.warden.mcp.prompts
} else := _allow(sprintf("completing the arguments of the prompt %v is allowed", [asked.arguments.ref.name])) if {
	asked.kind == "argument_completion"
	asked.arguments.ref.type == "ref/prompt"
	asked.arguments.ref.name in data.warden.mcp.prompts
} else := _deny(sprintf("reading %v is not allowed for support agents: customer records are read through the catalogued tools, whose arguments are checked", [asked.arguments.uri])) if {
	asked.kind == "resource_read"
} else := _deny(sprintf("this %v request is not approved for support agents; ask the platform team to review it", [asked.tool]))

# An MCP tools/list answer (stage "list"): only the tool's name is known, so
# only what no arguments could make allowed is denied, which hides the tool
# from the listing. Every call is decided again, with its arguments.
list_verdict(tool) := _deny(sprintf("%v exports customer data in bulk, which support agents may never do", [tool])) if {
	data.warden.tools[tool].class == "bulk_export"
} else := _allow(sprintf("%v is in the customer-support tool catalogue; each call is checked with its arguments", [tool])) if {
	data.warden.tools[tool]
} else := _deny(sprintf("%v looks like a bulk export of customer data, which support agents may never do", [tool])) if {
	some prefix in data.warden.bulk_export_prefixes
	startswith(tool, prefix)
} else := _deny(sprintf("%v is not in the customer-support tool catalogue, so it is denied; ask the platform team to review it and add it", [tool]))

# A catalogued tool whose arguments do not match data.json is denied before
# its class rules run. The cheap `every` check keeps well-formed calls fast;
# the sentences are only built when it fails.
tool_verdict(tool, entry, args, budget) := _deny(concat("; ", problems)) if {
	spec := entry.args
	not _arguments_ok(spec, args)
	problems := argument_problems(tool, spec, args)
	count(problems) > 0
} else := class_verdict(entry.class, tool, entry, args, budget)

# What an MCP retry's answers carry that data.json does not let an answer
# decide (data.warden.mcp.answer_fields, or the tool's own "answers"). The
# server reads them with the arguments, and the class rules read only the
# arguments, so an amount typed in answer would pass every limit. An
# elicitation's content fields are named case-blind (Go and .NET servers bind
# them so); anything else an answer holds is named by what it is, which no
# list allows: a field beside action and content (a sampled message, roots),
# an action other than MCP's three, a content field holding more than one
# value, content that is a list of blocks or plain text, an answer that is
# not an object. (_meta is MCP's metadata, and passes.)
_unlisted_answer_fields(answers, allowed) := sort([name |
	some answer in answers
	some name in _answer_fields(answer)
	not name in allowed
])

# Arrays, not sets: this engine builds a set comprehension in time quadratic in
# its size, and the answers are the client's (the door also bounds their count).
_answer_fields(answer) := ["an answer that is not an object"] if {
	not is_object(answer)
} else := ["an action other than accept, decline or cancel"] if {
	not object.get(answer, "action", "accept") in {"accept", "decline", "cancel"}
} else := array.concat(_extra_fields(answer), _content_fields(object.get(answer, "content", null)))

_extra_fields(answer) := [key | some key; _ = answer[key]; not key in {"action", "content", "_meta", "resultType"}]

_content_fields(content) := [name | some key; value := content[key]; name := _content_field(key, value)] if {
	is_object(content)
} else := ["a list of blocks"] if {
	is_array(content)
} else := [] if {
	content == null # a declined or cancelled question carries none
} else := ["content that is not an object"]

_content_field(key, value) := lower(key) if {
	not is_object(value)
	not is_array(value)
} else := concat("", [lower(key), " holding more than one value"])

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

# Its `redact` list is added by `redacting`, as to every decision about the tool.
class_verdict("personal_data", _, entry, _, _) := _hold(sprintf("changing a customer's %v needs a support lead's approval", [entry.what]))

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

class_verdict("message", _, _, _, _) := _allow("sending a message to the customer is allowed")

# --- session rules: what happened earlier in the conversation ----------------
#
# input.history: the conversation's prior tool calls; `verified` is true only
# for a call Warden itself let through with the same tool and arguments.
# input.session: counters of this session (calls and held calls by tool,
# denials, approvals) and `taints`, the labels of tools whose output entered
# the conversation (tools.<name>.labels in Warden's configuration).
# data.warden.sessions holds the knobs.
with_session(base, act, hist, sess) := base if {
	base.effect == "deny"
} else := _deny(msg) if {
	msg := session_denial(act, sess)
} else := base if {
	base.effect != "allow"
} else := _hold(msg) if {
	msg := session_hold(act, hist, sess)
} else := base

# At most max_account_changes account changes (allowed or held) per session.
session_denial(call, counts) := sprintf("this conversation has already made %v account changes; at most %v are allowed in one conversation", [used, most]) if {
	call.tool in data.warden.sessions.account_change_tools
	used := account_changes(counts)
	most := data.warden.sessions.max_account_changes
	used >= most
}

account_changes(tally) := sum([n |
	some tool in data.warden.sessions.account_change_tools
	n := object.get(tally.calls, tool, 0) + object.get(tally.held, tool, 0)
])

# An untrusted source followed by a sensitive sink needs a person.
session_hold(proposed, past, state) := sprintf("%v sends data out, and untrusted content (a web page, an email) entered this conversation earlier; a support lead must check it is not a prompt injection", [proposed.tool]) if {
	"sensitive_sink" in proposed.labels
	"untrusted_output" in state.taints
} else := sprintf("%v sends data out, and this conversation is longer than Warden reads (history bounds), so what entered it earlier is unknown; a support lead must check it", [proposed.tool]) if {
	"sensitive_sink" in proposed.labels
	state.truncated == true
} else := sprintf("%v sends data out, and this session's counters cannot be read now (state store outage), so whether untrusted content entered it earlier is unknown; a support lead must check it", [proposed.tool]) if {
	"sensitive_sink" in proposed.labels
	state.available == false
} else := lookup_message(past, proposed.arguments.order_id) if {
	# Refund only an order looked up in this conversation (data: refund_needs_lookup).
	data.warden.sessions.refund_needs_lookup == true
	state.conversation == true
	proposed.tool == "issue_refund"
	not looked_up(past, proposed.arguments.order_id)
}

# (This engine does not match `history[i].tool in set` while `i` is unbound:
# the tool is bound first.)
looked_up(seen, order) if {
	some i
	seen[i].verified == true
	ids := lookup_ids(seen, order)
	ids[i]
}

# Positions of the calls in `entries` that looked up order `wanted`, verified or not.
# An empty or non-string order id was looked up by nothing.
lookup_ids(entries, wanted) := ids_by_order(entries, wanted) | ids_by_query(entries, wanted)

ids_by_order(lookups, order_wanted) := {i |
	is_string(order_wanted)
	order_wanted != ""
	some i
	tool := lookups[i].tool
	tool in data.warden.sessions.lookup_tools
	lookups[i].arguments.order_id == order_wanted
}

ids_by_query(searches, text_wanted) := {i |
	is_string(text_wanted)
	text_wanted != ""
	some i
	tool := searches[i].tool
	tool in data.warden.sessions.lookup_tools
	query := searches[i].arguments.query
	is_string(query)
	# The whole order id as a word of the query: a search for "A-10" is no lookup of "A-1".
	words := regex.split(`[^A-Za-z0-9_-]+`, query)
	text_wanted in words
}

lookup_message(prior, missing) := sprintf("order %v was looked up in this conversation, but not by a call Warden let through (the history was changed); a refund for it needs a support lead", [missing]) if {
	count(lookup_ids(prior, missing)) > 0
} else := sprintf("order %v was not looked up in this conversation; a refund for it needs a support lead", [missing])

_allow(reason) := {"effect": "allow", "reason": reason}

_deny(reason) := {"effect": "deny", "reason": reason}

_hold(reason) := {
	"effect": "require_approval",
	"reason": reason,
	"approvers": data.warden.approvals.approvers,
	"hold_timeout_s": data.warden.approvals.hold_timeout_s,
}
