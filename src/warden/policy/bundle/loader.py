"""Turning bundle files into a checked :class:`Bundle`, and merging bundles.

A bundle is a directory or a ``.tar.gz`` holding ``.rego`` modules, data files
(``data.json`` / ``data.yaml``, placed at the path of their folder) and an
optional ``.manifest`` (``{"revision": "...", "roots": ["..."]}``) and
``.signatures.json``. Loading never evaluates a policy. Every error is a
:class:`BundleError` whose message starts with ``file:line`` where there is one.

Only ``.rego`` files, data files and ``.manifest`` shape the policy (and its
content revision). Other files -- READMEs, decision tables for ``warden
policy test`` -- are read but only matter to signatures: as in OPA, a signed
bundle must list every file. Hidden files and folders (``.git``) are skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from warden.policy.bundle.files import (
    DATA_FILES,
    bundle_name,
    content_revision,
    is_policy_file,
    read_bundle_files,
)
from warden.policy.bundle.manifest import parse_json, parse_manifest, roots_overlap, within
from warden.policy.bundle.model import Bundle, BundleError, Module
from warden.policy.bundle.text import package_of
from warden.policy.bundle.verify import verify_bundle_files
from warden.policy.bundle.yaml_data import load_data_yaml

if TYPE_CHECKING:
    from warden.config import SigningConfig

__all__ = ["MAX_DATA_ITEMS", "build_bundle", "load_bundle", "load_bundles", "merge_bundles"]

MAX_DATA_ITEMS = 25_000
"""The most items one array or object in a data file may hold. The engine loads data in
time that grows with the square of one array's or object's length (on a 2-core machine
10,000 strings took 4.5 s, 20,000 about 19 s, 40,000 never compiled within the 60 s
deadline), and then the bundle would never activate. Set where a bundle that loaded
before still loads (about 30 s at 25,000): a lower bound refused bundles that worked.
Split ones are fast: 20,000 items in lists of 1,000 load in 0.4 s."""


def _parse_yaml(label: str, body: bytes) -> Any:
    try:
        return load_data_yaml(body)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark is not None else label
        raise BundleError(f"{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise BundleError(f"{label}: invalid YAML: {exc}") from None


def _place(tree: dict[str, Any], path: tuple[str, ...], value: Any, origin: str) -> None:
    """Merge ``value`` into ``tree`` at ``path``; a clash of leaves is an error."""
    node = tree
    for key in path:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise BundleError(f"{origin}: data path {'/'.join(path)} clashes with a value")
        node = child
    if not isinstance(value, dict):
        if path:
            raise BundleError(f"{origin}: must hold a JSON object at its folder's path")
        raise BundleError(f"{origin}: top-level data must be a JSON object")
    _deep_merge(node, value, origin, path)


def _deep_merge(
    into: dict[str, Any], value: Mapping[str, Any], origin: str, at: Sequence[str]
) -> None:
    for key, item in value.items():
        if key in into:
            if isinstance(into[key], dict) and isinstance(item, dict):
                _deep_merge(into[key], item, origin, (*at, key))
                continue
            raise BundleError(f"{origin}: data path {'/'.join((*at, key))} is set twice")
        into[key] = item


_Entry = tuple[Any, "_Entry | None", str | int]
"""A value in data, the entry of the array or object holding it, and its key there."""


def _check_data_sizes(value: Any, folder: tuple[str, ...], origin: str) -> None:
    """Refuse an array or object longer than :data:`MAX_DATA_ITEMS`, naming its path."""
    # A stack, not recursion (data nests as deep as its parser allows); each entry
    # links to its parent, so that a path is spelled only for the error.
    stack: list[_Entry] = [(value, None, "")]
    while stack:
        entry = stack.pop()
        node = entry[0]
        if len(node) > MAX_DATA_ITEMS:
            kind = "object" if isinstance(node, dict) else "array"
            raise BundleError(
                f"{origin}: {_data_path(folder, entry)} is an {kind} of {len(node):,} items, "
                f"over the {MAX_DATA_ITEMS:,} the engine loads in time (its load time grows "
                "with the square of the length); split it into several of at most 1,000 "
                '(for example {"part1": [...], "part2": [...]}) and look values up in each'
            )
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((v, entry, k) for k, v in pairs if isinstance(v, (dict, list)))


def _data_path(folder: tuple[str, ...], entry: _Entry | None) -> str:
    """``data.a.b[3]["x y"]``: where an entry of :func:`_check_data_sizes` lies."""
    keys: list[str | int] = []
    while entry is not None and entry[1] is not None:
        keys.append(entry[2])
        entry = entry[1]
    text = "data"
    for key in (*folder, *reversed(keys)):
        if isinstance(key, int):
            text += f"[{key}]"
        elif key.isidentifier():
            text += f".{key}"
        else:
            text += f"[{orjson.dumps(key).decode()}]"
    return text


def _check_data_roots(value: Any, path: tuple[str, ...], roots: Sequence[str], origin: str) -> None:
    """Every data leaf must lie under a root; descend while a root is deeper."""
    here = "/".join(path)
    if any(within(here, r) for r in roots):
        return
    if isinstance(value, dict) and any(within(r, here) for r in roots):
        for key, item in value.items():
            _check_data_roots(item, (*path, key), roots, origin)
        return
    raise BundleError(
        f"{origin}: data path {here or '/'} is outside the bundle roots {list(roots)}"
    )


def build_bundle(
    files: Mapping[str, bytes],
    *,
    source: str,
    name: str = "",
    signing: SigningConfig | None = None,
    check_syntax: bool = True,
) -> Bundle:
    """Turn raw bundle files into a checked :class:`Bundle` (see :func:`load_bundle`)."""
    label = source
    signature = None
    if signing is not None and (signing.required or signing.keys):
        signature = verify_bundle_files(files, signing, label=label)
    revision, roots = parse_manifest(label, files)
    modules: list[Module] = []
    data: dict[str, Any] = {}
    for rel in sorted(files):
        body = files[rel]
        base = rel.rsplit("/", 1)[-1]
        if rel.endswith(".rego"):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = body[: exc.start].count(b"\n") + 1
                raise BundleError(f"{label}/{rel}:{line}: not valid UTF-8") from None
            module = Module(rel, text)
            declared = package_of(text)
            if declared is None:
                raise BundleError(f"{label}/{rel}:1: no package declaration")
            pkg, at = declared
            if not any(within(pkg, r) for r in roots):
                line = text.count("\n", 0, at) + 1
                raise BundleError(
                    f"{label}/{rel}:{line}: package {pkg.replace('/', '.')} is outside "
                    f"the bundle roots {list(roots)}"
                )
            modules.append(module)
        elif base in DATA_FILES:
            where = f"{label}/{rel}"
            value = parse_json(where, body) if base == "data.json" else _parse_yaml(where, body)
            if value is None:
                value = {}
            try:
                orjson.dumps(value)
            except TypeError as exc:  # YAML allows keys and values JSON cannot hold
                raise BundleError(f"{where}: not representable as JSON: {exc}") from None
            folder = tuple(rel.split("/")[:-1])
            _check_data_sizes(value, folder, where)
            _place(data, folder, value, where)
            _check_data_roots(value, folder, roots, where)
    if not modules:
        raise BundleError(f"{label}: bundle holds no .rego modules")
    if check_syntax:
        # Loads the engine: only tools and tests check syntax here; the proxy's
        # workers check it when they compile.
        from warden.policy.bundle.compile import check_syntax as parse_modules  # noqa: PLC0415

        parse_modules(modules, label)
    return Bundle(
        revision=revision or content_revision(files),
        roots=roots,
        modules=tuple(modules),
        data=data,
        source=source,
        name=name,
        signed_by=signature.key_id if signature is not None else None,
        file_hashes={
            k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items()) if is_policy_file(k)
        },
        signed_at={name or source: signature.issued_at} if signature is not None else None,
    )


def load_bundle(
    path: str | Path,
    *,
    signing: SigningConfig | None = None,
    check_syntax: bool = True,
) -> Bundle:
    """Load one bundle directory or ``.tar.gz``.

    Checks, in order: signatures (when ``signing`` is given and either requires
    them or configures keys), the manifest, every module's package against the
    roots, data files, and module syntax. Raises :class:`BundleError` with
    ``file:line`` on the first problem. It does not compile the modules
    together: use :func:`warden.policy.bundle.compile.compile_check` for that.
    """
    files = read_bundle_files(path)
    return build_bundle(
        files, source=str(path), name=bundle_name(path), signing=signing, check_syntax=check_syntax
    )


def load_bundles(paths: Iterable[str | Path], *, signing: SigningConfig | None = None) -> Bundle:
    """Load several bundles and merge them (see :func:`merge_bundles`)."""
    return merge_bundles([load_bundle(p, signing=signing) for p in paths])


def merge_bundles(bundles: Sequence[Bundle]) -> Bundle:
    """Combine bundles with disjoint roots into one.

    Overlapping roots are refused, as OPA does. With more than one bundle, each
    module's path gets its bundle's name as a prefix so paths stay unique and
    error messages say which bundle a file came from. The revision is the
    bundles' revisions joined by ``+``, in the order given.
    """
    if not bundles:
        raise BundleError("no policy bundles configured")
    if len(bundles) == 1:
        return bundles[0]
    for i, a in enumerate(bundles):
        for b in bundles[i + 1 :]:
            for ra in a.roots:
                for rb in b.roots:
                    if roots_overlap(ra, rb):
                        raise BundleError(
                            f"{a.source} and {b.source}: roots overlap "
                            f"({ra or '/'!r} and {rb or '/'!r}); give each bundle its own roots"
                        )
    named = [b.name or f"bundle{i}" for i, b in enumerate(bundles)]
    for i, name in enumerate(named):
        if name in named[:i]:
            # Module paths and the newest signing time (rollback protection) go by name.
            raise BundleError(
                f"{bundles[named.index(name)].source} and {bundles[i].source}: two bundles "
                f"named {name!r}; give each folder (or bundle URL) its own name"
            )
    data: dict[str, Any] = {}
    modules: list[Module] = []
    for index, bundle in enumerate(bundles):
        _deep_merge(data, bundle.data, bundle.source, ())
        prefix = bundle.name or f"bundle{index}"
        modules.extend(Module(f"{prefix}/{m.path}", m.source) for m in bundle.modules)
    return Bundle(
        revision="+".join(b.revision for b in bundles),
        roots=tuple(r for b in bundles for r in b.roots),
        modules=tuple(modules),
        data=data,
        source=", ".join(b.source for b in bundles),
        name="+".join(b.name for b in bundles),
        signed_by=",".join(b.signed_by for b in bundles if b.signed_by) or None,
        file_hashes={
            f"{b.name or i}/{k}": v
            for i, b in enumerate(bundles)
            for k, v in (b.file_hashes or {}).items()
        },
        signed_at=_signing_times(bundles),
    )


def _signing_times(bundles: Sequence[Bundle]) -> dict[str, int | None] | None:
    """Each signed bundle's signing time, by name (names are unique once merged)."""
    times = {name: at for b in bundles for name, at in (b.signed_at or {}).items()}
    return times or None
