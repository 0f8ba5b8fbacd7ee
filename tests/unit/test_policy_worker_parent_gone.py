"""A policy worker whose parent goes while it starts (a stop signal during Warden's start-up)
exits quietly: its traceback on the shared stderr read as a crash."""

from __future__ import annotations

import socket
import subprocess
import sys

import orjson

from warden.policy.worker import frame

POLICY = 'package warden\nimport rego.v1\ndefault decision := {"effect": "allow"}\n'


def test_a_worker_whose_parent_left_before_its_hello_exits_without_a_traceback() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "warden.policy.worker", str(child.fileno())],
        pass_fds=(child.fileno(),),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    child.close()
    init = {"modules": [["p.rego", POLICY]], "data": {}, "query": "data.warden.decision"}
    parent.sendall(frame(orjson.dumps(init)))
    # The parent goes before the worker answers: its hello meets a closed socket.
    parent.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    parent.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert b"Traceback" not in err, err.decode()
