"""Warden: a governance sidecar for AI agents.

It sits between an agent and the LLM and tool APIs it calls, decides on every
tool call with Rego policies, holds high-impact actions for people, and keeps a
tamper-evident record of everything it let through.
"""

__version__ = "0.1.0"
