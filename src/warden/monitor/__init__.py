"""Drift and quality monitoring of agents, read from the audit log.

The modules are pure readers of what Warden already records:

* :mod:`~warden.monitor.events` turns decision, outcome and approval records
  into small frozen events;
* :mod:`~warden.monitor.psi` is the population stability index and the
  binning it needs;
* :mod:`~warden.monitor.drift` compares a reference window (the previous N
  days, or a pinned :mod:`~warden.monitor.baseline`) with the current one
  per agent and agent version, over the tool mix, the decision-effect mix
  and binned numeric arguments;
* :mod:`~warden.monitor.quality` computes deny, hold and approval-rejection
  rates, the tool error rate, cost per conversation and p95 added latency;
* :mod:`~warden.monitor.live` keeps Prometheus gauges of both up to date
  from a background task, off the request path.

The console and the CLI (``warden monitor``) call :func:`warden.monitor.drift.compute`
and :func:`warden.monitor.quality.compute`, which return frozen dataclasses.
"""
