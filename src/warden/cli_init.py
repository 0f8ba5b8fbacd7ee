"""``warden init``: a starter ``warden.yaml`` and a policy bundle to edit, with its tests.

It writes, into the folder given (default: the current one)::

    warden.yaml                         every setting a new sidecar needs, commented
    policies/customer-support/          the shipped bundle: policy.rego, data.json,
                                        policy_test.rego and decisions/*.yaml tables
    policies/customer-support-evals/    its eval suite (warden eval run)

``--approver NAME`` and ``--admin NAME`` (repeatable) make an admin token for
each person, list its SHA-256 in ``admin.tokens`` with that role, and print the
token once: someone can approve held actions on the first run. An approver's
token is put in the approver groups the bundle's data.json names
(``approvals.approvers``: support-leads), or in those ``--approver-group``
names (repeatable) instead.

It never overwrites a file unless ``--force`` is given; even then only the files
it writes (the bundle's ``.manifest`` included) are replaced, and any other file
in the bundle's folder stays. Exit status: 0 when written, 1 when a file is in
the way, 2 when the shipped bundle cannot be found or ``--approver-group`` is
given without ``--approver``.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from warden.config import DEFAULT_POLICY_BUNDLES, PACKAGED_BUNDLE
from warden.identity import hash_key

__all__ = [
    "APPROVERS_IN_DATA",
    "STARTER_CONFIG",
    "approver_groups",
    "init",
    "register",
    "starter_config",
]

EXIT_OK = 0
EXIT_EXISTS = 1
EXIT_NO_BUNDLE = 2
EXIT_USAGE = 2

BUNDLE_DIR = Path(DEFAULT_POLICY_BUNDLES[0])
# The shipped bundle's eval suite, beside it in the checkout and in the wheel alike.
SUITE = BUNDLE_DIR.with_name(BUNDLE_DIR.name + "-evals") / "suite.jsonl"
APPROVERS_IN_DATA: Final = ("warden", "approvals", "approvers")
"""Where the shipped bundle's data names the approver groups its holds go to."""

STARTER_CONFIG = """\
# Warden's configuration. Every key is optional; `warden config --config warden.yaml`
# prints the effective settings, and an invalid file fails at start naming the key.
# Relative paths are relative to the folder `warden serve` runs in (this one).
# Environment variables override the file: WARDEN_MODE=observe, WARDEN_LISTEN__PROXY=...

agent: {id: support-triage}     # the agent this sidecar serves when a request names none
mode: enforce                   # observe: the policy blocks nothing, records would_deny and
                                # would_hold; kill switches still block, and a call Warden cannot
                                # check exactly (a key spelled otherwise than declared) is denied

listen:
  proxy: 127.0.0.1:8080         # point the SDK's base URL here: http://127.0.0.1:8080/openai/v1
  admin: 127.0.0.1:8081         # /metrics, /healthz, /readyz and the admin API

upstreams:                      # the only hosts Warden will call
  openai: {protocol: openai, base_url: https://api.openai.com}
  anthropic: {protocol: anthropic, base_url: https://api.anthropic.com}

tools:                          # risk class picks the fallback when the policy fails
  search_kb: {risk: read_only}
  get_ticket: {risk: read_only}
  get_order: {risk: read_only}
  get_customer: {risk: read_only}
  issue_refund: {risk: high}
  close_account: {risk: high}

policy:
  # Edit it, then check it: warden policy test policies/customer-support
  # It reloads without a restart when its files change.
  bundles: [policies/customer-support]
  deadline_ms: 50
  fallback: {read_only: allow, write: deny, high: deny}

approvals:
  mode: hold                    # the agent's request waits for a person (or: defer)
  # Used only when the policy names no hold time: the shipped bundle's data.json asks
  # 3600 s (approvals.hold_timeout_s there), and the policy's wins. A held request stays
  # open that long, so raise the agent SDK's read timeout to match (openai's is 600 s).
  hold_timeout_s: 120

admin:
  # Who may decide approvals (`warden approvals list|approve|reject`, the console) and
  # use the admin API. None configured: every admin call answers 401 and nobody can
  # approve. Only a token's SHA-256 goes here; make a token and its digest with
  #   token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
  #   echo "$token" | warden identity hash-key
  # and give the token to its holder: `WARDEN_TOKEN=$token warden approvals list`.
  # Replace [] with entries such as (groups: the approvers a policy names):
  #   - {subject: dana, roles: [approver], groups: [support-leads], sha256: <64 hex digits>}
  #   - {subject: ops, roles: [admin], sha256: <64 hex digits>}
  tokens: []

audit: {dir: ./warden-data/audit, fsync: always}
state: {url: "sqlite:///./warden-data/state.db"}
shutdown_grace_s: 20
"""


def shipped_bundle() -> Path | None:
    """The customer-support bundle that came with Warden (installed, or in the checkout)."""
    checkout = Path(__file__).resolve().parents[2] / BUNDLE_DIR
    for candidate in (PACKAGED_BUNDLE, checkout):
        if (candidate / "policy.rego").is_file():
            return candidate
    return None


def approver_groups(bundles: Sequence[str | Path]) -> tuple[str, ...] | None:
    """The approver groups the bundles' data names at :data:`APPROVERS_IN_DATA`.

    Read from the data files alone, without evaluating the policy. ``None`` when
    a bundle cannot be read (the policy engine reports why) or the data names
    none, or names them otherwise than as a list of strings.
    """
    from warden.policy.bundle import BundleError, load_bundle, merge_bundles

    try:
        data: Any = merge_bundles([load_bundle(b, check_syntax=False) for b in bundles]).data
    except (BundleError, OSError, ValueError):
        return None
    for key in APPROVERS_IN_DATA:
        data = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(data, list) or not data or not all(isinstance(g, str) for g in data):
        return None
    return tuple(data)


def init(
    folder: Path,
    *,
    force: bool = False,
    people: Sequence[tuple[str, str]] = (),
    groups: Sequence[str] = (),
) -> int:
    """Write the starter files into ``folder``; the exit status (see the module docs).

    ``groups``: the approver groups of the approvers' tokens; by default those the
    shipped bundle's data names, so its holds are theirs to decide.
    """
    source = shipped_bundle()
    if source is None:
        print(
            "warden init: the shipped policy bundle is missing from this install", file=sys.stderr
        )
        return EXIT_NO_BUNDLE
    config = folder / "warden.yaml"
    bundle = folder / BUNDLE_DIR
    suite_source = source.parent / SUITE.relative_to(BUNDLE_DIR.parent)
    suite = folder / SUITE if suite_source.is_file() else None
    if _in_the_way(source, folder, bundle, config, suite, force=force):
        return EXIT_EXISTS
    roles: dict[str, list[str]] = {}
    for role, subject in people:
        if role not in roles.setdefault(subject, []):
            roles[subject].append(role)
    tokens = {subject: (", ".join(r), secrets.token_urlsafe(32)) for subject, r in roles.items()}
    if not groups and any("approver" in r for r in roles.values()):
        # The groups the bundle written here sends its holds to: without one of them
        # an approver token is refused every approval the bundle asks for.
        groups = approver_groups([source]) or ()
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(starter_config(tokens, groups=groups), encoding="utf-8")
    if tokens:
        config.chmod(0o600)  # it names who may decide; the tokens themselves are not in it
    # Over an existing bundle, only the shipped files are rewritten: the user's own stay.
    shutil.copytree(source, bundle, ignore=_not_shipped, dirs_exist_ok=True)
    if suite is not None:
        suite.parent.mkdir(exist_ok=True)
        shutil.copyfile(suite_source, suite)
    _report(config, bundle, suite, tokens, groups)
    return EXIT_OK


def _in_the_way(
    source: Path, folder: Path, bundle: Path, config: Path, suite: Path | None, *, force: bool
) -> bool:
    """Whether a file in the way stops ``init`` (it says which)."""
    if not force:
        in_the_way = [p for p in (config, bundle, suite) if p is not None and p.exists()]
        if in_the_way:
            names = ", ".join(str(p) for p in in_the_way)
            print(
                f"warden init: {names} already exists; nothing was written (--force overwrites)",
                file=sys.stderr,
            )
            return True
    linked = _links_in_the_way(source, folder, bundle, config, suite)
    if linked is not None:
        # Written through, a link would overwrite a file outside the folder (and the
        # bundle would go on reading it from there).
        print(
            f"warden init: {linked} is a symbolic link; nothing was written (remove it, "
            "or choose another folder)",
            file=sys.stderr,
        )
        return True
    return False


def _report(
    config: Path,
    bundle: Path,
    suite: Path | None,
    tokens: Mapping[str, tuple[str, str]],
    groups: Sequence[str],
) -> None:
    """What was written, the tokens (this once), and the commands to run next."""
    print(f"wrote {config}")
    print(f"wrote {bundle}/ (policy.rego, data.json, policy_test.rego, decisions/)")
    if suite is not None:
        print(f"wrote {suite}")
    for subject, (role, token) in tokens.items():
        # Shown once: warden.yaml keeps only its SHA-256.
        shown = role
        if "approver" in role and groups:
            shown += f" in {', '.join(groups)}"
        print(f"admin token for {subject} ({shown}; shown once, keep it secret): {token}")
    print("next:")
    print(f"  warden policy test {BUNDLE_DIR}     # its Rego tests and decision tables")
    if suite is not None:
        print(f"  warden eval run {SUITE} --bundle {BUNDLE_DIR}")
    print("  warden serve --config warden.yaml")
    if tokens:
        print("  WARDEN_TOKEN=<token> warden approvals list   # or sign in to the console")


def starter_config(tokens: Mapping[str, tuple[str, str]], *, groups: Sequence[str] = ()) -> str:
    """:data:`STARTER_CONFIG` with ``admin.tokens`` listing ``tokens`` (subject to its
    roles, comma-separated, and token), each token stored as its SHA-256 only; a token
    with the approver role is in the approver ``groups``."""
    if not tokens:
        return STARTER_CONFIG
    # Quoted: a name YAML would read as a number, a date or a boolean stays text.
    in_groups = f", groups: [{', '.join(json.dumps(g) for g in groups)}]" if groups else ""
    entries = "".join(
        f"\n    - {{subject: {json.dumps(subject)}, roles: [{role}]"
        f"{in_groups if 'approver' in role else ''}, sha256: {hash_key(token)}}}"
        for subject, (role, token) in tokens.items()
    )
    return STARTER_CONFIG.replace("  tokens: []\n", f"  tokens:{entries}\n", 1)


def _person(role: str) -> Callable[[str], tuple[str, str]]:
    def parse(subject: str) -> tuple[str, str]:
        if not _SUBJECT.fullmatch(subject):
            raise argparse.ArgumentTypeError(
                f"{subject!r}: a name of letters, digits and . _ @ - (it shows in the log)"
            )
        return role, subject

    return parse


_SUBJECT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Group names also come from an SSO proxy's headers (team:leads, org/leads).
_GROUP: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:/-]{0,127}")


def _group(name: str) -> str:
    if not _GROUP.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{name!r}: a group name of letters, digits and . _ @ : / - (up to 128)"
        )
    return name


def _links_in_the_way(
    source: Path, folder: Path, bundle: Path, config: Path, suite: Path | None
) -> Path | None:
    """The first path ``init`` would write through that is a symbolic link, if any.

    Every folder on the way from ``folder`` counts: a ``policies`` linked elsewhere
    would have the bundle written there. ``folder`` itself is the user's choice.
    """
    written = [config, bundle, *([suite] if suite is not None else [])]
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if not _not_shipped(str(path.parent), list(relative.parts)):
            written.append(bundle / relative)
    checked: set[Path] = set()
    for target in written:
        on_the_way = folder
        for part in target.relative_to(folder).parts:
            on_the_way = on_the_way / part
            if on_the_way in checked:
                continue
            checked.add(on_the_way)
            if on_the_way.is_symlink():
                return on_the_way
    return None


def _not_shipped(folder: str, names: list[str]) -> set[str]:
    # .manifest names the bundle's revision and roots; other dot files are a checkout's.
    return {n for n in names if n == "__pycache__" or (n.startswith(".") and n != ".manifest")}


def _run(args: argparse.Namespace) -> int:
    if args.groups and not any(role == "approver" for role, _ in args.people):
        print(
            "warden init: --approver-group names the groups of the --approver tokens; "
            "give --approver NAME too",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return init(Path(args.folder), force=args.force, people=args.people, groups=args.groups)


def register(sub: Any) -> None:
    """Add ``warden init`` to the ``warden`` command's subparsers."""
    parser = sub.add_parser(
        "init",
        help="write a starter warden.yaml and a policy bundle (with its tests) to edit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", nargs="?", default=".", help="where to write (default: here)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite the files it writes that are already there (others are kept)",
    )
    parser.add_argument(
        "--approver",
        dest="people",
        action="append",
        type=_person("approver"),
        default=[],
        metavar="NAME",
        help="make an admin token with the approver role for NAME (repeatable): its "
        "SHA-256 goes into admin.tokens, the token is printed once",
    )
    parser.add_argument(
        "--approver-group",
        dest="groups",
        action="append",
        type=_group,
        default=[],
        metavar="GROUP",
        help="put the --approver tokens in this approver group (repeatable), in place of "
        "the groups the bundle's data.json names (approvals.approvers)",
    )
    parser.add_argument(
        "--admin",
        dest="people",
        action="append",
        type=_person("admin"),
        metavar="NAME",
        help="the same with the admin role (kill switches, every admin call)",
    )
    parser.set_defaults(func=_run)
