"""``warden audit verify|export|verify-evidence|proof|erase|reindex``: work on an audit log offline.

``verify`` and ``export`` also work on the central audit store: ``--url
postgresql://...`` (every sidecar's log, or one with ``--log``).
``verify-evidence`` checks an evidence package with this installation's own
verifier, never the copy of ``verify_evidence.py`` inside the package.

:func:`register` adds the ``audit`` command to the main CLI's subparsers; each
subcommand stores its handler in ``args.func`` (``func(args) -> int``, the exit
status). ``python -m warden.cli_audit`` runs the same commands on their own.

The audit directory is ``--dir``, else ``audit.dir`` of the configuration
(``--config``, ``$WARDEN_CONFIG``, ``WARDEN_AUDIT__DIR``).

Exit status: 0 success (``verify``: the log is intact); 1 the log is damaged
or the request cannot be met; 2 the input is unusable (no log there, bad key).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from warden import __version__
from warden.audit import verify_evidence
from warden.audit.central import CentralError, export_central, verify_central
from warden.audit.checkpoint import NoteError, NoteVerifier
from warden.audit.export import EXPORT_FORMATS, ExportError, Selection, export_log, inclusion_proof
from warden.audit.export import parse_time as _parse_time
from warden.audit.layout import Layout, LogLocked
from warden.audit.record import arguments_digest, arguments_sha256
from warden.audit.subjects import SubjectKeys, keyed_digest
from warden.audit.verify import VerifyReport, key_fingerprint, verify_log
from warden.config import AuditConfig, Config, load_config
from warden.errors import AuditError, ConfigError
from warden.password_file import read_password_file
from warden.state.postgres import PgTarget
from warden.terminal import reader_left

__all__ = ["main", "register"]

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2


class _Unusable(Exception):
    """The command cannot start: print the message, exit 2."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` with its ``verify``, ``export``, ``verify-evidence``, ``proof`` and
    ``erase`` subcommands."""
    audit = subparsers.add_parser(
        "audit",
        help="verify, export and prove the tamper-evident audit log",
        description="Work on Warden's audit log offline. Exit 0: success; 1: damaged or "
        "refused; 2: unusable input.",
    )
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, key: bool = True) -> None:
        p.add_argument("--dir", help="the audit directory (default: audit.dir from the config)")
        p.add_argument(
            "--config",
            dest="audit_config",
            metavar="FILE",
            help="Warden's config file (default: $WARDEN_CONFIG)",
        )
        if key:
            p.add_argument(
                "--key",
                metavar="VKEY",
                help="the verifier key checkpoints must carry, or a file holding it "
                "(default: the key stored in the directory)",
            )

    def central(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            metavar="URL",
            help="the central audit store (postgresql://...) instead of an audit directory",
        )
        p.add_argument(
            "--log",
            dest="log_id",
            metavar="ORIGIN",
            help="with --url: only this sidecar's log (its origin, warden.local/audit/...)",
        )
        p.add_argument(
            "--password-file",
            metavar="FILE",
            help="with --url: a file holding the password (default: PGPASSWORD, ~/.pgpass)",
        )

    verify = commands.add_parser(
        "verify",
        help="check frames, hash chain, Merkle tree and signed checkpoints",
        description="Check every record and checkpoint. Exit 0 when intact; otherwise name the "
        "first bad record and the kind of damage and exit 1.",
    )
    common(verify)
    central(verify)
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="FILE",
        help="a checkpoint kept elsewhere to check the log against (repeatable)",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_verify)

    export = commands.add_parser(
        "export",
        help="write an evidence package (or CSV / OCSF) for a period",
        description="Export the records of a period that a signed checkpoint covers.",
    )
    common(export)
    central(export)
    export.add_argument(
        "--from", dest="start", metavar="TIME", help="first day or RFC 3339 time (inclusive)"
    )
    export.add_argument(
        "--to", dest="end", metavar="TIME", help="last day (inclusive) or RFC 3339 time (exclusive)"
    )
    export.add_argument("--agent", help="only this agent's records")
    export.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="a new directory (evidence) or file (csv, ocsf)",
    )
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="evidence",
        help="evidence package (default), csv, or ocsf JSON lines",
    )
    export.set_defaults(func=_export)

    evidence = commands.add_parser(
        "verify-evidence",
        help="check an evidence package with this installation's verifier",
        description="Check an evidence package made by `warden audit export` with the "
        "verifier of this Warden installation, not the verify_evidence.py inside the "
        "package (whoever made the package could have replaced that). Exit 0 when every "
        "check passes; 1 when one fails; 2 when the package or the key is unusable.",
    )
    evidence.add_argument("package", metavar="DIR", help="the evidence package (a directory)")
    evidence.add_argument(
        "--key",
        required=True,
        metavar="VKEY",
        help="the log's verifier key, or a file holding it, obtained from its operator "
        "independently (never the package's log-key.vkey)",
    )
    evidence.set_defaults(func=_verify_evidence)

    proof = commands.add_parser("proof", help="print the inclusion proof of one record (JSON)")
    common(proof)
    proof.add_argument(
        "--record", required=True, metavar="ID", help="a record id (rec_...) or sequence number"
    )
    proof.set_defaults(func=_proof)

    digest = commands.add_parser(
        "digest",
        help="the digest a record keeps of arguments it does not show, for checking a claim",
        description="A record keeps a keyed digest (keyed: ...) of arguments it redacts or "
        "seals, so nobody without this log's key folder can find them by hashing guesses. "
        "Given the arguments someone says an action had, print the digest to compare.",
    )
    common(digest, key=False)
    digest.add_argument(
        "--arguments", required=True, metavar="JSON", help="the arguments, as a JSON object"
    )
    digest.set_defaults(func=_digest)

    erase = commands.add_parser(
        "erase",
        help="erase a data subject: their key, and their rows in the state store (GDPR / CCPA)",
        description="Destroy the encryption key of one data subject (a customer id): their "
        "personal fields become unreadable, and every hash and checkpoint still verifies. "
        "Their call links, approvals' arguments and Responses chains in the state store "
        "(state.url) are erased too: here when Warden is stopped, else by the running "
        "Warden at its next checkpoint.",
    )
    common(erase, key=False)
    erase.add_argument("--subject", required=True, metavar="ID", help="the customer id")
    erase.set_defaults(func=_erase)

    reindex = commands.add_parser(
        "reindex",
        help="rebuild the console's decision index from the log",
        description="Throw the decision index away and index every record of the log again. "
        "The index is only a cache for search; the log stays the source of truth.",
    )
    common(reindex, key=False)
    reindex.add_argument(
        "--index",
        metavar="FILE",
        help="the SQLite index (default: console.index, else <audit dir>-index.sqlite); "
        "with state.url postgresql://... the index is in that database",
    )
    reindex.set_defaults(func=_reindex)


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures into a message on stderr and an exit status."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BrokenPipeError:
            raise  # `... | head`: the reader left; the CLI's entry point ends quietly
        except (_Unusable, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (ExportError, AuditError, LogLocked, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_DAMAGED

    return run


def _config(args: argparse.Namespace) -> Config:
    path = args.audit_config or getattr(args, "config", None) or os.environ.get("WARDEN_CONFIG")
    config = load_config(path)
    if args.dir:
        config = config.model_copy(
            update={"audit": config.audit.model_copy(update={"dir": args.dir})}
        )
    return config


def _audit_config(args: argparse.Namespace) -> AuditConfig:
    return _config(args).audit


def _root(args: argparse.Namespace) -> Path:
    root = Path(_audit_config(args).dir)
    if not Layout(root).meta.exists():
        raise _Unusable(f"{root} holds no Warden audit log (no log.json)")
    try:
        Layout(root).read_meta()
    except OSError as exc:
        raise _Unusable(f"{root}/log.json is unreadable: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, or not the object Warden writes
        raise _Unusable(f"{root}/log.json is unusable: {exc}") from None
    return root


def _verifier(args: argparse.Namespace, root: Path) -> NoteVerifier:
    if getattr(args, "key", None) is None:
        try:
            return Layout(root).verifier()
        except (OSError, NoteError) as exc:
            raise _Unusable(f"unusable verifier key: {exc}") from None
    key = _given_key(args, inside=root)
    assert key is not None
    return key


def _target(args: argparse.Namespace) -> PgTarget:
    if args.dir:
        raise _Unusable("give either --dir or --url, not both")
    if not args.url.startswith(("postgresql://", "postgres://")):
        raise _Unusable("--url must start with postgresql://")
    password = None
    if args.password_file:
        try:
            password = read_password_file(args.password_file, "--password-file")
        except ConfigError as exc:
            raise _Unusable(str(exc)) from None
    return PgTarget(args.url, password)


def _given_key(args: argparse.Namespace, *, inside: Path | None = None) -> NoteVerifier | None:
    """``--key``: a verifier key, or a file holding one, never under ``inside``.

    A value that is a key is the key, even when a file of that name exists: a
    key's text is also a relative path (``origin/<hex>+<hash>+<base64>``), and
    a log or package checked from its own directory could hold a file there
    with the forger's key. A file inside what is checked is its maker's too.
    """
    value = getattr(args, "key", None)
    if value is None:
        return None
    try:
        return NoteVerifier.from_vkey(value)
    except NoteError:
        pass  # not a key: a file holding one
    path = Path(value)
    if inside is not None and path.resolve().is_relative_to(inside.resolve()):
        raise _Unusable(
            f"--key {value}: a file inside {inside}, which whoever made it chose; give the "
            "key the log's operator published"
        )
    try:
        return NoteVerifier.from_vkey(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, NoteError) as exc:
        raise _Unusable(f"unusable verifier key: {exc}") from None


def _verify_central(args: argparse.Namespace) -> int:
    target = _target(args)
    try:
        found = asyncio.run(verify_central(target, log_id=args.log_id, verifier=_given_key(args)))
    except CentralError as exc:
        raise _Unusable(str(exc)) from None
    if args.json:
        body = {
            "ok": found.ok,
            "url": found.url,
            "logs": [
                {
                    "log": log.log_id,
                    "ok": report.ok,
                    "records": report.records,
                    "checkpoints": report.checkpoints,
                    "latest_checkpoint": report.latest_checkpoint,
                    "root": report.root,
                    "damage": [
                        {"kind": d.kind, "seq": d.seq, "record_id": d.record_id, "detail": d.detail}
                        for d in report.damage
                    ],
                    "warnings": list(report.warnings),
                }
                for log, report in found.logs
            ],
            "missing": list(found.missing),
            "warnings": list(found.warnings),
        }
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK if found.ok else EXIT_DAMAGED
    if not found.logs and not found.missing:
        print(f"{found.url} holds no audit logs yet")
    for name in found.missing:
        print(
            f"MISSING {name}: the store holds no log {name}, whose key --key is: its rows "
            "were removed (by someone who disabled the append-only triggers), or it never shipped"
        )
    for log, report in found.logs:
        if report.ok:
            latest = report.latest_checkpoint
            print(
                f"intact: {log.log_id}: {report.records} records; {report.checkpoints} signed "
                "checkpoint(s) verified"
                + (f", the latest at size {latest}" if latest is not None else "")
            )
            for warning in report.warnings:
                print(f"warning: {log.log_id}: {warning}")
        else:
            for damage in report.damage:
                print(f"DAMAGED {log.log_id}: {damage.describe()}")
            for warning in report.warnings:  # a downgrade's records, say, beside damage
                print(f"warning: {log.log_id}: {warning}")
    for warning in found.warnings:
        print(f"warning: {warning}")
    return EXIT_OK if found.ok else EXIT_DAMAGED


@_guarded
def _verify(args: argparse.Namespace) -> int:
    if args.url:
        return _verify_central(args)
    root = _root(args)
    key = _verifier(args, root)  # the given key, else the directory's: unusable, exit 2
    # None tells verify the key is the directory's own: it proves less, and says so.
    given = key if args.key is not None else None
    report = verify_log(root, verifier=given, extra_checkpoints=args.checkpoint)
    if args.json:
        body = {
            "ok": report.ok,
            "key": {
                "name": report.key.partition("+")[0],
                "fingerprint": key_fingerprint(report.key),
                "vkey": report.key,
                "source": "directory" if report.key_from_directory else "given",
            },
            "records": report.records,
            "segments": report.segments,
            "checkpoints": report.checkpoints,
            "latest_checkpoint": report.latest_checkpoint,
            "root": report.root,
            "seconds": report.seconds,
            "damage": [
                {
                    "kind": d.kind,
                    "seq": d.seq,
                    "record_id": d.record_id,
                    "segment": d.segment,
                    "offset": d.offset,
                    "detail": d.detail,
                }
                for d in report.damage
            ],
            "warnings": list(report.warnings),
        }
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    elif report.ok:
        latest = report.latest_checkpoint
        print(
            f"intact: {report.records} records in {report.segments} segment(s); "
            f"{report.checkpoints} signed checkpoint(s) verified"
            + (f", the latest at size {latest}" if latest is not None else "")
        )
        print(f"root {report.root}; {report.rate:,.0f} records/s")
        _print_key(root, report)
        for warning in report.warnings:
            print(f"warning: {warning}")
    else:
        for damage in report.damage:
            print(f"DAMAGED {damage.describe()}")
        for warning in report.warnings:  # a downgrade's records, say, beside damage
            print(f"warning: {warning}")
        _print_key(root, report)
    return EXIT_OK if report.ok else EXIT_DAMAGED


def _print_key(root: Path, report: VerifyReport) -> None:
    """Which key the checkpoints were checked with, and a warning when the log supplied it."""
    name = report.key.partition("+")[0]
    shown = f"key {name}, fingerprint SHA256:{key_fingerprint(report.key)}"
    if not report.key_from_directory:
        print(f"checked with the {shown} (--key)")
        return
    # A key next to the records proves only what whoever can write the directory allows.
    print(
        f"warning: checked with the {shown}, read from {Layout(root).vkey} in the directory "
        "itself: whoever can rewrite the log can replace it; pass --key with the verifier "
        "key published when the log began"
    )


@_guarded
def _export(args: argparse.Namespace) -> int:
    selection = Selection(
        start=_parse_time(args.start) if args.start else None,
        end=_parse_time(args.end, end=True) if args.end else None,
        agent=args.agent,
    )
    if args.url:
        target = _target(args)
        try:
            log, result = asyncio.run(
                export_central(
                    target,
                    args.out,
                    log_id=args.log_id,
                    selection=selection,
                    fmt=args.format,
                    verifier=_given_key(args),
                )
            )
        except CentralError as exc:
            raise _Unusable(str(exc)) from None
        print(f"log {log.log_id} from {target.shown}:")
    else:
        root = _root(args)
        result = export_log(
            root, args.out, selection=selection, fmt=args.format, verifier=_verifier(args, root)
        )
    print(
        f"exported {result.records} records ({result.format}) to {result.path}, "
        f"covered by the signed checkpoint at size {result.tree_size}"
    )
    if result.uncovered:
        print(
            f"note: {result.uncovered} records of the period are newer than the latest "
            "checkpoint and were left out; export again after the next checkpoint"
        )
    if result.shortened:
        print(
            f"note: the latest checkpoint was signed at {result.signed_at}, before the end of "
            "the period asked for: the export declares and covers the period up to then; "
            "export again once a later checkpoint exists (a running Warden signs one every "
            "audit.checkpoint_interval_s)"
        )
    if result.unprovable and result.format == "evidence":
        print(
            "note: the latest checkpoint carries no time (the log was written before "
            "checkpoints did): the evidence verifier cannot show the package complete up to "
            "the period's end; export without --to, or once the log has a later checkpoint"
        )
    if result.format == "evidence":
        _how_to_check(Path(args.out))
    return EXIT_OK


def _how_to_check(out: Path) -> None:
    """The command docs/audit.md gives auditors, with a verifier they obtained themselves."""
    # Never the package's own verify_evidence.py: whoever made the package could replace it
    # with one that says OK to anything.
    print(
        f"auditors check it with their own Warden: warden audit verify-evidence "
        f'{shlex.quote(str(out))} --key "<the verifier key>" (or verify_evidence.py from '
        "the Warden release, its SHA-256 compared with the one published with the release; "
        "not the copy in the package)"
    )
    # Never the key in the package, or in the log's folder: whoever could rewrite the
    # log could have put theirs there. The key you published when the log began.
    print(
        "give them the verifier key you published when this log began (its "
        "keys/checkpoint.vkey then, docs/audit.md), through another channel than the "
        "package: not the package's log-key.vkey, which whoever made it chose"
    )


@_guarded
def _verify_evidence(args: argparse.Namespace) -> int:
    key = _given_key(args, inside=Path(args.package))
    assert key is not None  # --key is required
    print(
        f"checking with the evidence verifier of Warden {__version__} "
        f"({verify_evidence.__file__}), not the package's own verify_evidence.py"
    )
    print(
        f"with the key {key.name}, fingerprint SHA256:{key_fingerprint(key.vkey)}: compare it "
        "with the one the log's operator published"
    )
    return verify_evidence.check(Path(args.package), key.vkey)


@_guarded
def _proof(args: argparse.Namespace) -> int:
    root = _root(args)
    proof = inclusion_proof(root, args.record, verifier=_verifier(args, root))
    print(orjson.dumps(proof, option=orjson.OPT_INDENT_2).decode())
    if proof["checkpoint"] is None:
        print("note: no signed checkpoint covers this record yet", file=sys.stderr)
    return EXIT_OK


@_guarded
def _digest(args: argparse.Namespace) -> int:
    root = _root(args)
    try:
        claimed = orjson.loads(args.arguments)
    except orjson.JSONDecodeError as exc:
        raise _Unusable(f"--arguments is not JSON: {exc}") from None
    if not isinstance(claimed, dict):
        raise _Unusable("--arguments must be a JSON object")
    # The digest records keep: RFC 8785's, or for what it cannot write (a whole number
    # past 2**53 - 1) the prefixed record encoding's.
    print(keyed_digest(root, arguments_digest(claimed) or arguments_sha256(None)))
    return EXIT_OK


@_guarded
def _erase(args: argparse.Namespace) -> int:
    from warden.erasure import erase_stopped  # the state store's modules: only here

    config = _config(args)
    root = _root(args)
    try:
        erasure = asyncio.run(erase_stopped(config, args.subject))
    except AuditError as exc:
        if not isinstance(exc.__cause__, LogLocked):
            raise
        # A running Warden holds the log: leave a note, then destroy the key here;
        # at its next checkpoint Warden drops its cached copy, erases the subject
        # from its state store and memory, and records the erasure. The note
        # comes first: killed after it, the erasure is still finished (the running
        # Warden destroys the key too if it is still there).
        keys = SubjectKeys.open(root, create=False)
        ref = keys.ref(args.subject)
        has_key = keys.load(ref) is not None
        keys.note_erasure(ref, key_destroyed=has_key)
        try:
            existed = keys.erase(ref) or has_key
        except FileNotFoundError:  # the running Warden took the note and the key meanwhile
            existed = True
        _erased(existed)
        print(
            "note: Warden is running; at its next checkpoint it erases the subject from its "
            "state store and records the erasure"
        )
        return EXIT_OK
    _erased(erasure.key_destroyed)
    if erasure.state is None:
        print(
            "error: the state store could not be reached; Warden erases the subject there "
            "at its next checkpoint once it runs",
            file=sys.stderr,
        )
        return EXIT_DAMAGED
    shown = ", ".join(f"{what} {n}" for what, n in sorted(erasure.state.items()) if n)
    print(f"state store: {shown or 'nothing held about this subject'}")
    return EXIT_OK


def _erased(existed: bool) -> None:
    if existed:
        print("erased: the subject's key is destroyed; their personal fields can no longer be read")
    else:
        print("nothing to erase in the log: no key for this subject (never recorded, or erased)")


@_guarded
def _reindex(args: argparse.Namespace) -> int:
    from warden.audit.indexes import open_index

    root = _root(args)
    path = args.audit_config or getattr(args, "config", None) or os.environ.get("WARDEN_CONFIG")
    # SQLite beside the log, or the fleet's PostgreSQL when state.url names one.
    index = open_index(load_config(path), root, path=args.index)
    try:
        count = index.rebuild(root)  # an unreachable database: IndexUnavailable, exit 1
    finally:
        index.close()
    print(f"indexed {count} records of {root} into {index.where}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``audit`` commands on their own: ``python -m warden.cli_audit audit verify``.

    The leading ``audit`` may be left out.
    """
    parser = argparse.ArgumentParser(prog="warden")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["audit"] and argv[:1] != ["-h"] and argv[:1] != ["--help"]:
        argv.insert(0, "audit")
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return reader_left()
    return code


if __name__ == "__main__":
    sys.exit(main())
