"""Policy bundles: load, check and merge OPA-layout bundles.

A bundle is a directory or a ``.tar.gz`` holding ``.rego`` modules, data files
(``data.json`` / ``data.yaml``, placed at the path of their folder) and an
optional ``.manifest`` (``{"revision": "...", "roots": ["..."]}``) and
``.signatures.json``. This module is pure: it reads files and checks them, and
never evaluates a policy. Every error is a :class:`BundleError` whose message
starts with ``file:line`` where there is one.

Only ``.rego`` files, data files and ``.manifest`` shape the policy (and its
content revision). Other files -- READMEs, decision tables for ``warden
policy test`` -- are read but only matter to signatures: as in OPA, a signed
bundle must list every file. Hidden files and folders (``.git``) are skipped.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from warden.errors import PolicyError

if TYPE_CHECKING:
    from warden.config import SigningConfig

__all__ = [
    "MANIFEST_FILE",
    "SIGNATURES_FILE",
    "Bundle",
    "BundleError",
    "Module",
    "compile_bundle",
    "compile_check",
    "load_bundle",
    "load_bundles",
    "merge_bundles",
    "read_bundle_files",
    "roots_overlap",
]

MANIFEST_FILE = ".manifest"
SIGNATURES_FILE = ".signatures.json"
DATA_FILES = frozenset({"data.json", "data.yaml"})
# Bounds so that a hostile or broken bundle server cannot exhaust memory.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_FILES = 10_000

_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([^\s#]+)", re.MULTILINE)
_PKG_SEGMENT = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)|\["([^"]*)"\]')
_LOCATION = re.compile(r"(\d+):([^\s|()]+)\|(\d+)\|(\d+)")
_ERRORMSG = re.compile(r"\(errormsg (\d+):")


class BundleError(PolicyError):
    """A bundle cannot be used; the message names the file and line where known."""


@dataclass(frozen=True, slots=True)
class Module:
    """One Rego module: its path inside the bundle (``authz/tools.rego``) and source."""

    path: str
    source: str

    @property
    def package(self) -> str | None:
        """The package as a slash path (``warden/tools``), or ``None`` if none is declared."""
        return _package_path(self.source)


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle (or several merged with :func:`merge_bundles`).

    ``revision`` comes from ``.manifest``, else it is a content hash
    (``sha256:<12 hex>``). ``roots`` are the data paths the bundle owns
    (``""`` owns everything). ``data`` is the merged data tree. ``source``
    says where it came from, for logs. ``signed_by`` is the key id that
    verified it, if it was verified.
    """

    revision: str
    roots: tuple[str, ...]
    modules: tuple[Module, ...]
    data: Mapping[str, Any]
    source: str
    name: str = ""
    signed_by: str | None = None
    file_hashes: Mapping[str, str] | None = None
    """SHA-256 of each file's bytes, by bundle path; for status and audit."""


def _package_path(source: str) -> str | None:
    match = _PACKAGE.search(_strip_comments(source))
    if match is None:
        return None
    ref = match.group(1)
    parts = [a or b for a, b in _PKG_SEGMENT.findall(ref)]
    return "/".join(parts)


def _strip_comments(source: str) -> str:
    # Good enough for locating ``package``: a '#' inside a string on the package
    # line does not occur in practice.
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def _line_col(source: str, byte_offset: int) -> tuple[int, int]:
    prefix = source.encode("utf-8")[:byte_offset].decode("utf-8", errors="replace")
    line = prefix.count("\n") + 1
    col = len(prefix) - (prefix.rfind("\n") + 1) + 1
    return line, col


def _norm_root(root: str) -> str:
    return root.strip().strip("/")


def _segments(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (by whole segments)."""
    p, r = _segments(path), _segments(root)
    return p[: len(r)] == r


def roots_overlap(a: str, b: str) -> bool:
    """Two roots overlap when one is a segment-prefix of the other (``""`` overlaps all)."""
    return _within(a, b) or _within(b, a)


def _safe_member_path(name: str) -> str | None:
    """The normalised bundle path of an archive member, or ``None`` if unsafe."""
    pure = PurePosixPath(name.lstrip("/"))
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _wanted(path: str) -> bool:
    """Every file but hidden ones (``.git``, editor swap files), except our two."""
    parts = path.split("/")
    if len(parts) == 1 and parts[0] in (MANIFEST_FILE, SIGNATURES_FILE):
        return True
    return not any(p.startswith(".") for p in parts)


def is_policy_file(path: str) -> bool:
    """Whether a bundle file shapes the policy: modules, data and the manifest."""
    base = path.rsplit("/", 1)[-1]
    return path == MANIFEST_FILE or base.endswith(".rego") or base in DATA_FILES


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """Read the files of a bundle directory or ``.tar.gz`` as ``{bundle path: bytes}``.

    Hidden files are skipped (see the module docstring). Archive members that
    are links, devices or escape the bundle are refused.
    """
    p = Path(path)
    if p.is_dir():
        return _read_dir(p)
    if p.is_file():
        try:
            return read_tarball(p.read_bytes(), label=str(p))
        except OSError as exc:
            raise BundleError(f"{p}: cannot read: {exc.strerror}") from exc
    raise BundleError(f"{p}: no such bundle directory or archive")


def _read_dir(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for file in sorted(root.rglob("*")):
        if not file.is_file():
            continue
        rel = file.relative_to(root).as_posix()
        if not _wanted(rel):
            continue
        if file.is_symlink() and not file.resolve().is_relative_to(root.resolve()):
            raise BundleError(f"{root}/{rel}: symbolic link leaves the bundle")
        try:
            content = file.read_bytes()
        except OSError as exc:
            raise BundleError(f"{root}/{rel}: cannot read: {exc.strerror}") from exc
        total += len(content)
        _check_limits(str(root), rel, len(content), total, len(files) + 1)
        files[rel] = content
    return files


def read_tarball(blob: bytes, *, label: str = "bundle.tar.gz") -> dict[str, bytes]:
    """Read an OPA bundle archive held in memory (what a bundle server sends)."""
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                rel = _safe_member_path(member.name)
                if rel is None:
                    raise BundleError(f"{label}: member {member.name!r} escapes the bundle")
                if not member.isfile():
                    raise BundleError(f"{label}: {rel}: only regular files are allowed")
                if not _wanted(rel):
                    continue
                total += member.size
                _check_limits(label, rel, member.size, total, len(files) + 1)
                extracted = tar.extractfile(member)
                if extracted is None:  # pragma: no cover - isfile() guarantees a stream
                    raise BundleError(f"{label}: {rel}: cannot read")
                if rel in files:
                    raise BundleError(f"{label}: {rel}: appears twice in the archive")
                files[rel] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{label}: not a readable .tar.gz bundle: {exc}") from exc
    return files


def _check_limits(label: str, rel: str, size: int, total: int, count: int) -> None:
    if size > MAX_FILE_BYTES:
        raise BundleError(f"{label}/{rel}: file is over {MAX_FILE_BYTES} bytes")
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"{label}: bundle is over {MAX_BUNDLE_BYTES} bytes")
    if count > MAX_FILES:
        raise BundleError(f"{label}: bundle has over {MAX_FILES} files")


def content_revision(files: Mapping[str, bytes]) -> str:
    """A revision for a bundle without one: a hash over file names and contents."""
    digest = hashlib.sha256()
    for name in sorted(files):
        if not is_policy_file(name):
            continue
        body = files[name]
        digest.update(f"{name}\0{len(body)}\0".encode())
        digest.update(body)
    return f"sha256:{digest.hexdigest()[:12]}"


def _parse_json(label: str, body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{label}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def _parse_yaml(label: str, body: bytes) -> Any:
    try:
        return yaml.safe_load(body)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark is not None else label
        raise BundleError(f"{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise BundleError(f"{label}: invalid YAML: {exc}") from None


def _parse_manifest(label: str, files: Mapping[str, bytes]) -> tuple[str | None, tuple[str, ...]]:
    body = files.get(MANIFEST_FILE)
    if body is None:
        return None, ("",)
    manifest = _parse_json(f"{label}/{MANIFEST_FILE}", body)
    if not isinstance(manifest, dict):
        raise BundleError(f"{label}/{MANIFEST_FILE}:1: must be a JSON object")
    revision = manifest.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise BundleError(f"{label}/{MANIFEST_FILE}: revision must be a string")
    roots_raw = manifest.get("roots", [""])
    if not isinstance(roots_raw, list) or not all(isinstance(r, str) for r in roots_raw):
        raise BundleError(f"{label}/{MANIFEST_FILE}: roots must be a list of strings")
    roots = tuple(dict.fromkeys(_norm_root(r) for r in roots_raw)) or ("",)
    return revision or None, roots


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


def _check_data_roots(value: Any, path: tuple[str, ...], roots: Sequence[str], origin: str) -> None:
    """Every data leaf must lie under a root; descend while a root is deeper."""
    here = "/".join(path)
    if any(_within(here, r) for r in roots):
        return
    if isinstance(value, dict) and any(_within(r, here) for r in roots):
        for key, item in value.items():
            _check_data_roots(item, (*path, key), roots, origin)
        return
    raise BundleError(
        f"{origin}: data path {here or '/'} is outside the bundle roots {list(roots)}"
    )


def _module_line(source: str, pattern: re.Pattern[str]) -> int:
    match = pattern.search(source)
    return source.count("\n", 0, match.start()) + 1 if match else 1


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
    signed_by: str | None = None
    if signing is not None and (signing.required or signing.keys):
        from warden.policy.signing import verify_bundle_files  # noqa: PLC0415 - avoids a cycle

        signed_by = verify_bundle_files(files, signing, label=label)
    revision, roots = _parse_manifest(label, files)
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
            pkg = module.package
            if pkg is None:
                raise BundleError(f"{label}/{rel}:1: no package declaration")
            if not any(_within(pkg, r) for r in roots):
                line = _module_line(text, _PACKAGE)
                raise BundleError(
                    f"{label}/{rel}:{line}: package {pkg.replace('/', '.')} is outside "
                    f"the bundle roots {list(roots)}"
                )
            modules.append(module)
        elif base in DATA_FILES:
            where = f"{label}/{rel}"
            value = _parse_json(where, body) if base == "data.json" else _parse_yaml(where, body)
            if value is None:
                value = {}
            try:
                orjson.dumps(value)
            except TypeError as exc:  # YAML allows keys and values JSON cannot hold
                raise BundleError(f"{where}: not representable as JSON: {exc}") from None
            folder = tuple(rel.split("/")[:-1])
            _place(data, folder, value, where)
            _check_data_roots(value, folder, roots, where)
    if not modules:
        raise BundleError(f"{label}: bundle holds no .rego modules")
    if check_syntax:
        _check_syntax(modules, label)
    return Bundle(
        revision=revision or content_revision(files),
        roots=roots,
        modules=tuple(modules),
        data=data,
        source=source,
        name=name,
        signed_by=signed_by,
        file_hashes={
            k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items()) if is_policy_file(k)
        },
    )


def bundle_name(path: str | Path) -> str:
    """A short label for a bundle path: its folder or archive name without ``.tar.gz``."""
    base = Path(path).name
    for suffix in (".tar.gz", ".tgz"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


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
    together: use :func:`compile_check` for that.
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
    )


# --- compiling with regopy -------------------------------------------------------------------


def _new_interpreter() -> Any:
    import regopy  # noqa: PLC0415 - keeps ``import warden.policy.bundle`` light

    interp = regopy.Interpreter()
    # The library prints errors to stdout at its default level; we report them ourselves.
    interp.log_level = regopy.LogLevel.NONE
    return interp


def describe_rego_error(text: str, modules: Sequence[Module], *, label: str = "") -> list[str]:
    """Turn a regopy error s-expression into ``file:line:col: message`` lines."""
    by_path = {m.path: m for m in modules}
    out: list[str] = []
    chunks = re.split(r"\(error\b", text)[1:] or [text]
    for chunk in chunks:
        msg = "error"
        m = _ERRORMSG.search(chunk)
        if m is not None:
            # The length prefix counts bytes, so slice the encoded text.
            raw = chunk.encode()
            start = len(chunk[: m.end()].encode())
            msg = raw[start : start + int(m.group(1))].decode(errors="replace")
        where = label or "policy"
        for loc in _LOCATION.finditer(chunk):
            module = by_path.get(loc.group(2))
            if module is not None:
                line, col = _line_col(module.source, int(loc.group(3)))
                where = f"{_display(label, module.path)}:{line}:{col}"
                break
        text = f"{where}: {msg}"
        if text not in out:
            out.append(text)
    return out


def _display(label: str, path: str) -> str:
    return f"{label}/{path}" if label else path


def _check_syntax(modules: Sequence[Module], label: str) -> None:
    import regopy  # noqa: PLC0415

    for module in modules:
        interp = _new_interpreter()
        try:
            interp.add_module(module.path, module.source)
        except regopy.RegoError as exc:
            raise BundleError(
                "\n".join(describe_rego_error(str(exc), [module], label=label))
            ) from None


_CALL = re.compile(r"(?<![\w.\"])([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\(")
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`')
_HEAD = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.MULTILINE)
_KEYWORDS = frozenset(
    {
        "if",
        "not",
        "some",
        "every",
        "with",
        "in",
        "contains",
        "else",
        "default",
        "import",
        "package",
        "as",
        "and",
        "or",
        "set",
        "true",
        "false",
        "null",
    }
)


def _blank_strings_and_comments(source: str) -> str:
    """Replace strings and comments by spaces, keeping offsets and newlines."""

    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    out = []
    for line in _STRING.sub(blank, source).split("\n"):
        cut = line.find("#")
        out.append(line if cut < 0 else line[:cut] + " " * (len(line) - cut))
    return "\n".join(out)


def _check_functions(interp: Any, modules: Sequence[Module], label: str) -> None:
    """Refuse calls to functions that are neither built in nor defined in the bundle.

    regopy only reports these when the call is evaluated; OPA reports them at
    compile time, and so do we. The scan is deliberately lenient: any name
    that heads a line anywhere in the bundle counts as defined.
    """
    cleaned = {m.path: _blank_strings_and_comments(m.source) for m in modules}
    defined = {name for text in cleaned.values() for name in _HEAD.findall(text)}
    known: dict[str, bool] = {}
    for module in modules:
        text = cleaned[module.path]
        for match in _CALL.finditer(text):
            name = match.group(1)
            if name in _KEYWORDS or name.rsplit(".", 1)[-1] in defined:
                continue
            if name not in known:
                known[name] = bool(interp.is_builtin(name))
            if not known[name]:
                line, col = _line_col(module.source, len(module.source[: match.start()].encode()))
                raise BundleError(
                    f"{_display(label, module.path)}:{line}:{col}: unknown function {name}"
                    " (not a builtin available in this engine, nor defined in the bundle)"
                )


def compile_bundle(
    modules: Sequence[Module], data: Mapping[str, Any], query: str, *, label: str = ""
) -> tuple[Any, Any]:
    """Compile modules and data for ``query``; return ``(interpreter, compiled bundle)``.

    The compiled bundle (a ``regopy.Bundle``) can be evaluated by any other
    interpreter; the returned interpreter owns it and must be kept alive.
    Raises :class:`BundleError` as :func:`compile_check` does.
    """
    import regopy  # noqa: PLC0415

    interp = _new_interpreter()
    for module in modules:
        try:
            interp.add_module(module.path, module.source)
        except regopy.RegoError as exc:
            raise BundleError(
                "\n".join(describe_rego_error(str(exc), modules, label=label))
            ) from None
    _check_functions(interp, modules, label)
    try:
        interp.add_data_json(orjson.dumps(data).decode())
    except regopy.RegoError as exc:
        raise BundleError(f"{label or 'data'}: data rejected by the engine: {exc}") from None
    try:
        built = interp.build(query)
    except regopy.RegoError as exc:
        detail = "; ".join(m.split(": ", 1)[-1] for m in describe_rego_error(str(exc), modules))
        raise BundleError(f"query {query!r}: {detail}") from None
    if not built.ok():
        raise BundleError("\n".join(bundle_errors(built, modules, label=label)))
    return interp, built


def compile_check(
    modules: Sequence[Module], data: Mapping[str, Any], query: str, *, label: str = ""
) -> None:
    """Compile the modules and data for ``query`` as the engine will; raise on errors.

    Raises :class:`BundleError` whose message has one ``file:line:col: message``
    line per problem: syntax errors, calls to unknown functions, and rule
    conflicts the compiler detects (e.g. a set rule and a complete rule of the
    same name). Runs in the calling process and takes a few milliseconds per
    module; it never evaluates the policy.

    Caution: rego-cpp aborts the whole process when compiling some constructs
    (a builtin called under ``with input as``); the engine therefore compiles
    in its worker processes, never in the proxy.
    """
    compile_bundle(modules, data, query, label=label)


def bundle_errors(built: Any, modules: Sequence[Module], *, label: str = "") -> list[str]:
    """The compiler's messages for a failed ``Interpreter.build`` result."""
    from regopy.rego_shared import (  # noqa: PLC0415
        rego_bundle_node,
        rego_node_get,
        rego_node_json,
        rego_node_size,
    )

    node = rego_bundle_node(built._impl)
    lines: list[str] = []
    for i in range(rego_node_size(node)):
        lines.extend(
            describe_rego_error(rego_node_json(rego_node_get(node, i)), modules, label=label)
        )
    return lines or [f"{label or 'policy'}: the bundle failed to compile"]
