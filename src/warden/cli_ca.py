"""``warden ca``: the certificate authority of transparent mode.

::

    warden ca export --config warden.yaml                    # the CA certificate (PEM) on stdout
    warden ca export --config warden.yaml --out warden-ca.pem

Agents that go through the transparent proxy must trust this certificate
(see docs/transparent.md). When ``transparent.ca_dir`` holds no CA yet, one
is generated there first (key file 0600), exactly as ``warden serve`` would;
a configured ``ca_cert_file`` is printed as it is. Only the certificate is
ever printed, never the key.

Exit status: 0 done; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["register"]

EXIT_OK = 0
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ca export`` to the main CLI."""
    parser = subparsers.add_parser("ca", help="the transparent mode certificate authority")
    sub = parser.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    export = sub.add_parser("export", help="print the CA certificate agents must trust (PEM)")
    export.add_argument("--config", default=os.environ.get("WARDEN_CONFIG"))
    export.add_argument("--out", help="write the PEM to this file instead of stdout")
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from warden.config import TransparentConfig, load_config
    from warden.errors import ConfigError
    from warden.ingress.transparent_ca import ca_certificate_pem

    try:
        config = load_config(args.config)
        # Without a transparent section, the defaults say where the CA lives.
        pem = ca_certificate_pem(config.transparent or TransparentConfig())
    except ConfigError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.out is None:
        sys.stdout.write(pem.decode("ascii"))
        return EXIT_OK
    try:
        Path(args.out).write_bytes(pem)
    except OSError as exc:
        print(f"warden: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote the transparent mode CA certificate to {args.out}", file=sys.stderr)
    return EXIT_OK
