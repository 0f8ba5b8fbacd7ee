"""The audit log the proxy writes to: group commit, fail closed, signed checkpoints.

How an append works, on the event loop and without blocking it:

1. the record body is built (redacted, credentials dropped, personal fields
   sealed for the data subject), then, with no ``await`` in between, it gets
   the next sequence number and the previous record's hash, is encoded, hashed
   into the Merkle tree and framed: so record order, chain order and tree
   order are the same by construction;
2. the frame joins the pending batch; when no batch is being written, the
   batch goes to the log's one I/O thread (a queue put, no task), which
   writes it and fsyncs it (policy ``always``) while the next batch gathers:
   concurrent appenders share one fsync;
3. the I/O thread reports back with one ``call_soon_threadsafe`` per batch,
   and each appender's future resolves once its batch is durable.

Any failed write or fsync marks the log not writable, fails every waiting
append with :class:`~warden.errors.AuditError` and is never retried: the
proxy then refuses actions (fail closed) and readiness goes false.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import functools
import logging
import os
import queue
import re
import shlex
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from warden.audit import metrics
from warden.audit.checkpoint import (
    CLOSED,
    REOPENED,
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    load_signing_key,
)
from warden.audit.layout import Layout, LogMeta
from warden.audit.merkle import CompactRange, leaf_hash
from warden.audit.record import (
    REDACTED,
    RESERVED_KINDS,
    SCHEMA_VERSION,
    ApprovalEvidence,
    RecordRef,
    action_body,
    arguments_digest,
    decision_body,
    encode,
    mask_credentials,
    outcome_body,
    path_holds_arguments,
    tools_sha256,
)
from warden.audit.redaction import REDACT_ALL
from warden.audit.segments import (
    RECOVERED_KIND,
    SegmentWriter,
    TreeState,
    count_records,
    frame,
    list_segments,
    locate,
    open_writer,
)
from warden.audit.subjects import (
    UNUSABLE,
    SubjectKeys,
    SubjectMatch,
    subject_ids,
    subject_value,
)
from warden.audit.verify import key_fingerprint
from warden.audit.verify_evidence import CHECKPOINT_TIME
from warden.config import AuditConfig
from warden.errors import AuditError
from warden.model import Action, Decision, Outcome, RequestMeta

__all__ = ["MAX_RECORD_BYTES", "AuditLog", "Erasure", "Follower", "SubjectEraser"]

_KEYED_BODY_FIELDS = ("arguments_sha256", "binding")
"""Digests an appended record (an approval's) keeps of arguments it never shows."""

log = logging.getLogger("warden.audit")

MAX_RECORD_BYTES = 16 * 1024 * 1024
BATCH_SYNC_INTERVAL_S = 0.05
# How long a non-urgent record (an outcome) may wait to share a decision's fsync.
COALESCE_S = 0.01
"""With ``fsync: batch``, how long an acknowledged record may stay only in the page cache."""
TOOLS_REMEMBERED = 256
"""Declared-tools lists remembered as recorded (a few per request in flight)."""
# What callers (and through them agents) are told: the cause, with the log's paths,
# is in Warden's own log, written once when the log fails.
_FAILED = "the audit log failed to write (Warden's log says why)"
_NOT_WRITABLE = (
    "the audit log is not writable since a write failed (Warden's log says why); "
    "Warden fails closed until it is restarted on a healthy disk"
)
_REDACTION_MEMORY = 65_536  # decisions whose redactions outcome records must repeat
_SHOWN = 5  # bad checkpoint files a refusal names
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
UNUSABLE_REF = "unusable"
"""The ``subject`` of a record whose subject value could not be keyed (its fields are redacted)."""


@dataclass(frozen=True, slots=True)
class _Opened:
    layout: Layout
    meta: LogMeta
    signer: NoteSigner
    writer: SegmentWriter
    state: TreeState
    subjects: SubjectKeys
    lock_fd: int
    checkpointed: int
    reopened: tuple[str, ...]
    """The ``reopened`` lines every checkpoint of this run carries (it resumed a closed log,
    or continues a run that did)."""
    adopted: dict[str, Any] | None
    """The body of the record naming the unsigned records this start adopted."""


def _checkpoints_at_start(
    layout: Layout, signer: NoteSigner
) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint file that verifies with the log's key (``None``: none does),
    and the files newer than it that do not, each with why (smallest first).

    Each file is a signed note named after the size it covers; one that does
    not verify, or says another size, proves nothing about the records it is
    named after (anyone who can write the directory can put it there).
    """
    bad: list[tuple[Path, str]] = []
    for path in reversed(layout.checkpoint_files()):
        try:
            ckpt = Checkpoint.open(path.read_bytes(), signer.verifier)
            if ckpt.size != int(path.name):
                raise NoteError(f"it says size {ckpt.size}")
        except (NoteError, ValueError, OSError) as exc:
            log.warning(
                "audit: checkpoint file %s of the log in %s does not verify with the log's key: %s",
                path.name,
                layout.root,
                exc,
            )
            bad.append((path, str(exc)))
            continue
        return ckpt, bad[::-1]
    return None, bad[::-1]


def _opens(note: bytes, verifier: NoteVerifier) -> bool:
    try:
        Checkpoint.open(note, verifier)
    except ValueError:  # NoteError, or anything else malformed
        return False
    return True


def _key_changed(layout: Layout, signer: NoteSigner, key_file: str | None) -> AuditError | None:
    """The refusal to start a log that another key signed: its newest checkpoint file
    verifies with the verifier key stored in the folder, not with the key configured
    now (``audit.signing_key_file`` changed, set or left out, or a generated key lost).

    ``None`` when the keys are the same, or the stored one does not sign that file
    either: the files are then judged one by one (:func:`_checkpoints_at_start`).
    """
    files = layout.checkpoint_files()
    if not files:
        return None
    try:
        stored = layout.verifier()
        newest = files[-1].read_bytes()
    except (OSError, NoteError):
        return None
    configured = signer.verifier
    if stored.vkey == configured.vkey or stored.name != signer.name:
        return None
    if not _opens(newest, stored) or _opens(newest, configured):
        return None
    now, back = _key_now_and_back(layout, stored, key_file)
    root = shlex.quote(str(layout.root))
    return AuditError(
        f"the audit log in {layout.root} was signed with another key than the one "
        f"configured: its checkpoints verify with the log's verifier key {layout.vkey} "
        f"({stored.name}, fingerprint SHA256:{key_fingerprint(stored.vkey)}), not with the "
        f"key configured now (fingerprint SHA256:{key_fingerprint(configured.vkey)}, {now}). "
        "A log keeps the key it began with; Warden changed nothing in the folder. To go on "
        f"with this log, {back}. To sign with the new key, start a new log: set audit.dir "
        "to a new folder (or move this one aside) and start Warden; keep this folder as it "
        f"is, still verifiable with its own key (`warden audit verify --dir {root} --key "
        "<the verifier key published for it>`), and give your auditors the new log's "
        "keys/checkpoint.vkey"
    )


def _key_now_and_back(
    layout: Layout, stored: NoteVerifier, key_file: str | None
) -> tuple[str, str]:
    """What the key-change refusal calls the key configured now, and how to go back
    to the one that signed the log."""
    back = "configure the key that signed it again"
    if key_file is None:
        if layout.signing_key.exists():
            return f"audit.signing_key_file is not set: the key in {layout.signing_key}", back
        return (
            f"a new one: audit.signing_key_file is not set and {layout.signing_key}, "
            "where Warden keeps the key it generates, is missing",
            f"put the key that signed it back in {layout.signing_key}, or {back}",
        )
    now = f"audit.signing_key_file: {key_file}"
    try:  # the chart's default, a key generated in the folder, then a key supplied
        kept = NoteSigner(stored.name, load_signing_key(layout.signing_key)).verifier
    except (OSError, ValueError, TypeError):
        return now, back
    if kept.vkey != stored.vkey:
        return now, back
    return now, (
        "leave audit.signing_key_file out: Warden signs with the key it generated for "
        f"the log, still in {layout.signing_key}"
    )


def _unverified(
    layout: Layout, good: Checkpoint | None, bad: Sequence[tuple[Path, str]], size: int
) -> AuditError:
    """The refusal to start a log with checkpoint files newer than its newest good one
    that do not verify: they may claim records no real checkpoint signed."""
    after = good.size if good is not None else 0
    names = ", ".join(path.name for path, _ in bad[:_SHOWN])
    if len(bad) > _SHOWN:
        names += f" and {len(bad) - _SHOWN} more"
    why = "; ".join(f"{path.name}: {reason}" for path, reason in bad[:_SHOWN])
    files = (
        f"checkpoint file{'s' if len(bad) > 1 else ''} {names} in {layout.checkpoints} "
        f"{'do' if len(bad) > 1 else 'does'} not verify with the log's key ({why})"
    )
    if good is None:
        newest = "no checkpoint file of the log does"
    else:
        stop = ", signed when Warden stopped cleanly" if good.closed else ""
        newest = f"the newest that does is {after:020d} ({after} records{stop})"
    if size > after:
        one = after == size - 1
        span, them = (f"record {after}", "it") if one else (f"records {after}..{size - 1}", "them")
        where = " after it" if good is not None else ""
        if good is not None and good.closed:
            why = "added after that clean stop"
        else:
            why = "Warden cannot tell whether they were added after a clean stop"
        found = f"the log holds {span}{where}, which no checkpoint that verifies signed: {why}"
        found += f", and a file that proves nothing claims {them}. Warden will not take {them} on"
    else:
        found = (
            f"no record follows it, yet {'they claim' if len(bad) > 1 else 'it claims'} more "
            f"(the log holds {size} records): records were removed, or the files put there. "
            "Warden will not continue the log"
        )
    return AuditError(
        f"{files}, and {newest}; {found}. Inspect with `warden audit verify --dir "
        f"{shlex.quote(str(layout.root))} --key <the log's verifier key>`, which names the "
        "files and the records. Then restore the checkpoints from a copy, or configure the "
        "key that signed them (a log keeps one key: to sign with another, start a new log "
        "in a new audit.dir and keep this folder); or, once satisfied the records are "
        "Warden's own, move the files that do not verify out of the directory (keep them for "
        "the investigation) and start again: records no good checkpoint signed are then "
        "taken on as a crash's and named in a `log_recovered` record, or refused if the "
        "newest good checkpoint is a clean stop's"
    )


def _appended(layout: Layout, closed: Checkpoint, size: int) -> AuditError:
    """The refusal to start a log that holds records after its closed checkpoint."""
    first, last = closed.size, size - 1
    span, them = (
        (f"record {first}", "it") if first == last else (f"records {first}..{last}", "them")
    )
    found = locate(layout.root, first)
    where = ""
    if found is not None:
        path, offset = found
        later = [p.name for p in list_segments(path.parent) if p.name > path.name]
        where = (
            f" The first starts at byte {offset} of {path}: to set {them} aside, keep a copy "
            "of the directory for the investigation, then run "
            f"`truncate -s {offset} {shlex.quote(str(path))}`"
            + (f" and move {', '.join(later)} out of {path.parent}" if later else "")
            + ", and start Warden again."
        )
    return AuditError(
        f"the audit log in {layout.root} was closed cleanly at {closed.size} records (its "
        f"final checkpoint, signed when Warden stopped, says nothing follows), but it now "
        f"holds {span} after it: added after the fact by someone who can write the "
        f"directory. Warden will not take {them} on and sign {them}. `warden audit verify` "
        f"names {them} (`appended`).{where}"
    )


def _open_blocking(config: AuditConfig) -> _Opened:
    layout = Layout(Path(config.dir))
    meta = layout.init()
    lock_fd = layout.lock()
    try:
        # Nothing is written to the folder until the start is accepted: a refused
        # start leaves the verifier key, which is what auditors check the log with.
        signer = layout.signer(meta.origin, config.signing_key_file)
        changed = _key_changed(layout, signer, config.signing_key_file)
        if changed is not None:
            raise changed
        latest, bad = _checkpoints_at_start(layout, signer)
        if bad:
            # Decided before the writer opens: a refused start cuts and signs nothing.
            raise _unverified(layout, latest, bad, count_records(layout.root))
        checkpointed = latest.size if latest is not None else 0
        # Given the checkpoint: a bad frame under it is damage, never cut as a torn tail.
        writer, state = open_writer(layout.root, config.segment_max_bytes, covered=checkpointed)
        try:
            reopened, adopted = _resume(layout, signer, writer, state, latest=latest)
            # Accepted: now the keys are stored. A key generated for a new log has signed
            # nothing yet (_resume signs only with a key the log's checkpoints verified);
            # the verifier key is put right if an older release's refused start replaced it.
            layout.keep_signer(signer, config.signing_key_file)
            subjects = SubjectKeys.open(layout.root, max_keys=config.subjects.max_keys)
        except BaseException:
            writer.abandon()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    return _Opened(
        layout, meta, signer, writer, state, subjects, lock_fd, checkpointed, reopened, adopted
    )


def _resume(
    layout: Layout,
    signer: NoteSigner,
    writer: SegmentWriter,
    state: TreeState,
    *,
    latest: Checkpoint | None,
) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """Decide how this start continues the log after its latest checkpoint.

    ``latest`` is the newest checkpoint, verified (``None``: the log has
    none; any newer file that does not verify has already refused the
    start). Returns the ``reopened`` lines this run signs (naming the clean
    close it resumes, or those of the run it continues after a crash) and
    the body of the record naming the unsigned records it adopts (a crash
    before). Raises :class:`AuditError` when the log must not be continued.
    """
    checkpointed = latest.size if latest is not None else 0
    if checkpointed > state.size:
        # A checkpoint is signed only over records already synced: a crash cannot
        # do this, only removal. Continuing would sign a second history.
        raise AuditError(
            f"the audit log in {layout.root} holds {state.size} records, but its signed "
            f"checkpoint {checkpointed} covers more: records were removed. Warden will "
            "not continue a shortened log; run `warden audit verify`, restore the "
            "directory from a copy (or the central store), or move it aside to start a "
            "new log"
        )
    if (
        latest is not None
        and state.size == latest.size != 0
        and state.compact().root() != latest.root
    ):
        raise AuditError(
            f"the last records of the audit log in {layout.root} do not match its signed "
            f"checkpoint {latest.size}: they were changed. Warden will not continue the "
            "log; run `warden audit verify`"
        )
    if latest is not None and latest.closed:
        if state.size > latest.size:
            raise _appended(layout, latest, state.size)
        # Signed at once, before any record of this run, and carried by each of its
        # checkpoints: what tells `verify` the records after the closed one are its own.
        lines = latest.resumed_lines()
        ckpt = Checkpoint(
            latest.origin,
            latest.size,
            latest.root,
            (f"{CHECKPOINT_TIME}{_Clock().now()}", *lines),
        )
        layout.write_checkpoint(latest.size, signer.sign(ckpt.text()))
        return lines, None
    # Continuing the run that signed `latest`: it keeps naming what that run resumed.
    lines = tuple(x for x in latest.extensions if x.startswith(REOPENED)) if latest else ()
    if state.size == checkpointed:
        return lines, None
    # The previous run stopped without closing the log (a crash, a kill): its last
    # records were never signed. They are taken on, and the log says so.
    first, last = checkpointed, state.size - 1
    torn = writer.torn_copy
    log.warning(
        "audit: the log in %s was not closed cleanly; adopting records %d..%d, which no "
        "checkpoint signed (written before a crash), and recording that%s",
        layout.root,
        first,
        last,
        f"; a torn tail was kept at {torn}" if torn is not None else "",
    )
    body = {
        "adopted": {"first": first, "last": last},
        "checkpoint": checkpointed if checkpointed else None,
        "torn": torn.relative_to(layout.root).as_posix() if torn is not None else None,
        "reason": "the log was not closed cleanly: records no checkpoint signed",
    }
    return lines, body


def _destroy_key(subjects: SubjectKeys, ref: str) -> bool:
    """Destroy a subject's key; whether there was one. Blocking I/O."""
    try:
        return subjects.erase(ref)
    except FileNotFoundError:  # unlinked meanwhile by another process (the CLI): gone
        return True


def _destroy_noted_key(root: Path, subjects: SubjectKeys, ref: str) -> bool:
    """Destroy the key a noted erasure was about, if it is still there. Blocking I/O.

    An erasure killed between its note and the key leaves the key older than
    the note. A key made after the note (the subject seen again while the
    state store was out of reach) is a new one, for records written since,
    and stays. Paths as docs/audit.md lays the directory out.
    """
    key = root / "subjects" / ref[:2] / f"{ref}.key"
    note = root / "subjects" / "erasures" / ref
    try:
        if key.stat().st_mtime_ns > note.stat().st_mtime_ns:
            return False
    except FileNotFoundError:
        return False
    return _destroy_key(subjects, ref)


Follower = Callable[[int, list[Mapping[str, Any]]], None]
"""Called with the first sequence number of a durable batch and its records."""

SubjectEraser = Callable[[SubjectMatch], Awaitable[Mapping[str, int]]]
"""Erases what a store beyond the log holds about the subjects matched; counts by what."""


@dataclass(frozen=True, slots=True)
class Erasure:
    """What erasing one data subject did (:meth:`AuditLog.erase`)."""

    subject: str
    """The pseudonymous reference the erasure record names (never the subject id)."""
    key_destroyed: bool
    state: Mapping[str, int] | None
    """What the state store (and this process's memory) erased, by what (``call_links``,
    ``approvals``...); ``None`` when it could not be reached: Warden tries again at each
    checkpoint, and when it next starts, until it can."""


_Done = Callable[[Any, BaseException | None], None]
"""Called on the event loop with a job's result, or the exception it raised."""


class _IoThread:
    """The log's one I/O thread: jobs run in the order given, one at a time.

    Cheaper per job than an executor (no ``concurrent.futures`` future, no
    wrapping task): a job is a queue put, and its report is one
    ``call_soon_threadsafe``. All of the log's disk work goes through here, so
    segment writes, fsyncs and checkpoints never run concurrently.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], _Done] | None]
        self._jobs = queue.SimpleQueue()
        # A daemon thread, so a log never closed cannot hang the interpreter's
        # exit; the atexit hook still lets queued writes finish first.
        self._thread = threading.Thread(target=self._run, name="warden-audit-io", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: _Done) -> None:
        """Run ``fn(*args)`` on the thread; ``done`` gets its outcome on the loop."""
        self._jobs.put((fn, args, done))

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on the thread; the future resolves with its outcome."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.submit(fn, args, functools.partial(_settle, fut))
        return fut

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # reported to the loop, which decides
                result, error = None, exc
            # A closed loop: nobody waits for this any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(done, result, error)

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread; blocks until it has."""
        atexit.unregister(self.stop)
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the waiter went away (cancelled)
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


class _Clock:
    """RFC 3339 UTC timestamps with microseconds; the date part is formatted once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        second, ns = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{ns // 1000:06d}Z"


def _masked_pointer(path: str) -> bool:
    """Whether a ``redacted`` entry is a masked value's pointer (``/api_key``,
    ``input_responses/...``) rather than a path the policy wrote."""
    return path.startswith(("/", "input_responses/"))


class AuditLog:
    """The tamper-evident audit log (see the module docstring and docs/audit.md).

    Create it with :meth:`open`; it satisfies :class:`warden.pipeline.AuditSink`.
    """

    def __init__(self, config: AuditConfig, opened: _Opened, io: _IoThread) -> None:
        self._config = config
        self._layout = opened.layout
        self._meta = opened.meta
        self._signer = opened.signer
        self._writer = opened.writer
        self._subjects = opened.subjects
        self._lock_fd = opened.lock_fd
        self._io = io
        self._loop = asyncio.get_running_loop()
        self._compact: CompactRange = opened.state.compact()
        self._last_hex = opened.state.last_hash.hex()
        self._durable: TreeState = opened.state
        self._advanced = asyncio.Event()  # set (and replaced) when records become durable
        self._checkpointed = opened.checkpointed
        self._reopened = opened.reopened
        self._clock = _Clock()
        # Where the subject sources look: context.*, action.arguments.*, agent.claims.*
        self._subject_roots = frozenset(s.partition(".")[0] for s in config.subjects.sources)
        # Record ids are unique across logs (the origin's random tag) and name
        # their sequence number, so `warden audit proof --record` needs no index.
        self._id_prefix = f"rec_{opened.meta.origin.rsplit('/', 1)[-1]}_"
        self._sync_each_batch = config.fsync == "always"
        self._never_synced = config.fsync == "never"
        self._synced = opened.state.size
        """Records on disk for good (fsync ``batch``: up to the last periodic sync)."""
        self._unsynced = False
        self._frames: list[bytes] = []
        self._records: list[Mapping[str, Any]] = []  # the frames' records, for followers
        self._inflight: list[Mapping[str, Any]] = []
        """The records of the batch on the I/O thread: stamped, numbered, not yet durable."""
        self._waiters: list[asyncio.Future[None]] = []
        self._followers: list[Follower] = []
        self._erasers: list[SubjectEraser] = []
        self._erasers_due = False
        """Set by :meth:`expect_erasers`: noted erasures wait for the first eraser."""
        self._erasing: set[str] = set()
        """Subjects an erasure is under way for here: their notes are not finished twice."""
        self._writing = False
        """A batch is due to start, on the I/O thread, or waking its appenders."""
        self._idle: list[asyncio.Future[None]] = []  # _drain() waiting for the last batch
        self._coalesce: asyncio.TimerHandle | None = None
        self._background: list[asyncio.Task[None]] = []
        self._checkpoint_lock = asyncio.Lock()
        self._redactions: dict[str, tuple[str, ...]] = {}
        self._tools_written: dict[int, tuple[weakref.ref[RequestMeta], str | None]] = {}
        """Requests whose declared tools a record holds in full, by identity and only as
        long as they live: their later decisions name the list by digest."""
        self._failure: str | None = None
        self._io_failure: BaseException | None = None  # set on the I/O thread
        self._accepting = True
        self._closed = False

    @classmethod
    async def open(cls, config: AuditConfig) -> AuditLog:
        """Open (or create) the log in ``config.dir`` and start its checkpointer.

        Creates the directory and keys on first start, cuts off a torn last
        frame left by a crash (keeping a copy) and takes the directory's write
        lock. Records after the latest checkpoint are taken on only when the
        log was not closed cleanly (a crash): a warning and a
        ``log_recovered`` record name them. Raises :class:`AuditError` when
        the log cannot be opened: held by another process, damaged beyond a
        torn tail, records after the checkpoint of a clean close (added by
        someone else), or unwritable.
        """
        loop = asyncio.get_running_loop()
        io = _IoThread(loop)
        try:
            opened = await io.call(_open_blocking, config)
        except Exception as exc:  # whatever stops it, the log is not available: fail closed
            io.stop()
            raise AuditError(f"cannot open the audit log in {config.dir}: {exc}") from exc
        self = cls(config, opened, io)
        if opened.adopted is not None:
            try:
                await self.append(RECOVERED_KIND, opened.adopted)
            except BaseException:
                await self.close()
                raise
        self._background.append(loop.create_task(self._checkpointer()))
        if config.fsync == "batch":
            self._background.append(loop.create_task(self._syncer()))
        log.info(
            "audit: log %s open in %s with %d records (fsync %s)",
            self.origin,
            config.dir,
            self.size,
            config.fsync,
        )
        return self

    # -- state ---------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False once a write or fsync failed (or after close): Warden must fail closed."""
        return self._failure is None and self._accepting

    @property
    def size(self) -> int:
        """The number of records written so far."""
        return self._durable.size

    @property
    def synced_size(self) -> int:
        """The records a power loss cannot take back: :attr:`size` with fsync ``always``,
        the size at the last periodic sync with ``batch``, :attr:`size` with ``never``
        (the operator gave that up). What leaves the host (shipping) stops there."""
        return self._durable.size if self._never_synced else self._synced

    def next_write(self) -> asyncio.Event:
        """An event set when more records are written. Take it before reading
        :attr:`size`, then wait on it: a write made meanwhile is not missed."""
        return self._advanced

    @property
    def origin(self) -> str:
        """The log's checkpoint origin, which is also the signing key's name."""
        return self._meta.origin

    @property
    def verifier_key(self) -> str:
        """The verifier key that checks this log's checkpoints (C2SP note format)."""
        return self._signer.verifier.vkey

    @property
    def directory(self) -> Path:
        """The audit directory."""
        return self._layout.root

    def follow(self, follower: Follower) -> None:
        """Call ``follower(first_seq, records)`` with every batch once it is durable.

        On the event loop, in log order, with the records as written (before
        encoding; the follower must not change them), once the appenders the
        batch released have run on: no request waits for a follower. Lets
        in-process readers (the drift monitor) skip reading back and decoding
        what was just written. A follower that raises is logged, never fails
        the log.
        """
        self._followers.append(follower)

    def on_erase(self, eraser: SubjectEraser) -> None:
        """Have every erasure of a data subject reach another store too (the state store).

        ``eraser`` is called with the subjects to erase, by reference, each time
        a subject is erased here (:meth:`erase`) or by the CLI while this process
        holds the log; its counts go into the ``erasure`` record. An eraser that
        raises leaves the erasure to be finished at the next checkpoint.
        """
        self._erasers.append(eraser)
        self._erasers_due = False

    def expect_erasers(self) -> None:
        """Say that erasers will be registered (:meth:`on_erase`) once the stores are open.

        Until then, erasures noted by the CLI are left for later: finished now,
        they would be recorded as done with nothing erased beyond the log.
        """
        self._erasers_due = not self._erasers

    # -- recording -----------------------------------------------------------

    async def record_decision(
        self, action: Action, decision: Decision, *, approval: ApprovalEvidence | None = None
    ) -> None:
        """Record a decision, durable (per the fsync policy) before returning.

        Raises :class:`AuditError` when the record cannot be made durable; the
        caller must then not let the action through.
        """
        redact = decision.obligations.redact
        self._remember_redactions(decision.decision_id, redact)
        act = action_body(action, redact)
        agent: dict[str, Any] = {"id": action.agent.id, "version": action.agent.version}
        if action.agent.claims:
            # The proof behind the id: which token vouched for this agent.
            agent["claims"] = dict(action.agent.claims)
        ref, aead = await self._subject_key(action)
        # After the last await: the list is in full in a record queued before this one.
        tools = self._tools_reference(action.request) if decision.input else None
        fields = {
            "agent": agent,
            "action": act,
            "decision": decision_body(decision, tools_sha256=tools),
            "approval": approval.as_dict() if approval is not None else None,
        }
        personal = self._personal(act, agent) if ref is not None else {}
        if ref is not None and aead is None:
            # A subject whose fields cannot be sealed: they are kept only redacted.
            if personal.pop("agent.claims", None) is not None:
                agent["claims"] = REDACTED
            personal.pop("action.redacted", None)  # its pointers go: the arguments go whole
            for path in personal:
                name = path.removeprefix("action.")
                if name == "request.path":
                    act["request"]["path"] = REDACTED
                else:
                    act[name] = REDACTED
                act["redacted"] = sorted({*act["redacted"], name})
            if act["arguments_sha256"] is None:
                act["arguments_sha256"] = arguments_digest(action.arguments, action.raw_arguments)
            personal = {}
        self._key_digest(act, "action.arguments_sha256", personal)
        if fields["approval"] is not None:
            # Keyed always, as the approval's own records are, so the two still match.
            self._key_digest(fields["approval"], "approval.arguments_sha256", personal)
        durable = self._commit("decision", fields, ref, aead, personal)[1]
        if tools is None and decision.input:
            self._tools_recorded(action.request)
        await durable

    def _tools_reference(self, request: RequestMeta) -> str | None:
        """The digest to record for ``request``'s tools if a record holds them in full.

        A model request's actions share one :class:`RequestMeta`: the first
        record carries its declared tools, the others their digest (a 1 MB list
        answered with 20 calls would otherwise write 20 MB). Requests are
        remembered weakly, so a finished request's list is not kept alive.
        """
        seen = self._tools_written.get(id(request)) if request.tools else None
        if seen is None or seen[0]() is not request:
            return None
        digest = seen[1]
        if digest is None:
            digest = tools_sha256(mask_credentials(list(request.tools)))
            self._tools_written[id(request)] = (seen[0], digest)
        return digest

    def _tools_recorded(self, request: RequestMeta) -> None:
        """Remember that a queued record holds ``request``'s tools in full."""
        key = id(request)
        if not request.tools or key in self._tools_written:
            return
        written = self._tools_written

        def forget(ref: weakref.ref[RequestMeta]) -> None:
            entry = written.get(key)
            if entry is not None and entry[0] is ref:
                del written[key]

        written[key] = (weakref.ref(request, forget), None)
        if len(written) > TOOLS_REMEMBERED:
            del written[next(iter(written))]

    def _personal(self, act: dict[str, Any], agent: dict[str, Any]) -> dict[str, Any]:
        """Take a subject's personal fields out of a decision record, by field path."""
        personal: dict[str, Any] = {}
        # Argument names too: a map keyed by e-mail address names its customer.
        for name in ("arguments", "raw_arguments", "argument_keys", "context", "input_responses"):
            if act.get(name) is not None:
                personal[f"action.{name}"] = act[name]
                act[name] = None
        request = act["request"]
        if path_holds_arguments(act) and request.get("path") not in (None, REDACTED):
            # A routed tool call's path spells its arguments (/customers/{email}).
            personal["action.request.path"] = request["path"]
            request["path"] = None
        if "claims" in agent and "agent" in self._subject_roots:
            # A token's claims may name the subject (agent.claims.sub is a source):
            # erasure must reach them too.
            personal["agent.claims"] = agent["claims"]
            agent["claims"] = None
        # The pointers of masked values are made of argument keys (a map keyed by
        # e-mail address): sealed with the arguments, the policy's paths left in sight.
        named = [p for p in act["redacted"] if not _masked_pointer(p)]
        if len(named) < len(act["redacted"]):
            personal["action.redacted"] = act["redacted"]
            act["redacted"] = named
        return personal

    def _key_digest(self, holder: dict[str, Any], path: str, personal: dict[str, Any]) -> None:
        """Key the digest at ``path`` (a value the record does not show).

        A plain SHA-256 of a redacted date of birth or a masked password is
        found by hashing guesses. With a data subject (``personal`` to seal),
        the digest is sealed with the rest, so erasure takes it too.
        """
        name = path.rpartition(".")[2]
        if holder.get(name) is None:
            return
        holder[name] = self._subjects.keyed(holder[name])
        if personal:
            personal[path], holder[name] = holder[name], None

    async def record_outcome(
        self, action: Action, decision_id: str, outcome: Outcome, *, cost: float | None = None
    ) -> None:
        """Record what happened after an action was let through.

        The decision's redaction obligations apply to the tool result too
        (paths ``result`` or ``result.<field>``). A decision this process did
        not record (or no longer remembers) has unknown redactions, so the
        result is then kept only as its hash. Raises :class:`AuditError`
        like :meth:`record_decision`.
        """
        out = outcome_body(outcome, self._redactions.get(decision_id, REDACT_ALL), cost)
        fields = {
            "agent": {"id": action.agent.id, "version": action.agent.version},
            "action": {
                "id": action.action_id,
                "kind": action.kind,
                "tool": action.tool,
                "protocol": action.protocol,
                "stage": action.stage,
            },
            "decision_id": decision_id,
            "outcome": out,
        }
        ref, aead = await self._subject_key(action)
        personal: dict[str, Any] = {}
        if ref is not None and out["result"] is not None:
            if aead is not None:
                personal["outcome.result"] = out["result"]
                out["result"] = None
            else:  # cannot be sealed: kept only as its hash
                full = outcome_body(outcome, ("result",), cost)
                out["result"], out["result_sha256"] = REDACTED, full["result_sha256"]
                out["redacted"] = ["result"]
        self._key_digest(out, "outcome.result_sha256", personal)  # of a result not shown whole
        await self._commit("outcome", fields, ref, aead, personal, urgent=False)[1]

    async def append(self, kind: str, body: Mapping[str, Any], *, urgent: bool = True) -> RecordRef:
        """Record any other event (approvals, kill switches, erasures) and return where it is.

        ``kind`` is lower-case ``[a-z0-9_]`` and not ``decision`` or
        ``outcome`` (else ``ValueError``). Credential-named keys in ``body``
        are masked; its ``arguments_sha256`` and ``binding`` (an approval's
        digests of arguments it does not show) are keyed. Raises
        :class:`AuditError` when the record cannot be encoded (``body`` is not
        JSON) or made durable. ``urgent=False``: a record nothing waits for (a
        challenger divergence) shares the next batch's fsync.
        """
        if not _KIND.fullmatch(kind) or kind in RESERVED_KINDS:
            raise ValueError(f"invalid record kind {kind!r}")
        shown = mask_credentials(body)
        for name in _KEYED_BODY_FIELDS:
            if isinstance(shown.get(name), str):
                shown[name] = self._subjects.keyed(shown[name])
        ref, fut = self._commit(kind, {"body": shown}, None, None, {}, urgent=urgent)
        await fut
        return ref

    async def erase_subject(self, subject_id: str) -> bool:
        """Erase a data subject (:meth:`erase`); return whether a key existed."""
        return (await self.erase(subject_id)).key_destroyed

    async def erase(self, subject_id: str) -> Erasure:
        """Erase a data subject (GDPR / CCPA): destroy their key, then what other stores
        hold about them (:meth:`on_erase`), and record that it happened.

        The ``erasure`` record names the subject only by its pseudonymous
        reference, with what the other stores erased (counts). When one of them
        cannot be reached, the record says so (``state: null``) and the rest is
        done, and recorded, at a later checkpoint.

        A note of the erasure (:meth:`SubjectKeys.note_erasure`) is written
        before the key is destroyed and removed only once the erasure is
        recorded with the other stores done: a crash anywhere in between leaves
        it, and whoever next holds the log finishes the erasure.
        """
        ref = self._subjects.ref(subject_id)
        self._erasing.add(ref)
        try:
            has_key = await self._blocking(self._subjects.load, ref) is not None
            await self._blocking(self._subjects.note_erasure, ref, has_key)
            destroyed = bool(await self._blocking(_destroy_key, self._subjects, ref))
            existed = destroyed or has_key  # or another process destroyed it meanwhile
            state = await self._erase_beyond(ref)
            await self._record_erasure(ref, existed, state)
            if state is not None:
                await self._blocking(self._subjects.finish_erasure, ref)
        finally:
            self._erasing.discard(ref)
        return Erasure(ref, existed, state)

    async def _erase_beyond(self, ref: str) -> dict[str, int] | None:
        """Run the erasers for ``ref``: summed counts, or ``None`` when one failed."""
        match = SubjectMatch(frozenset({ref}), self._config.subjects.sources, self._subjects.ref)
        counts: dict[str, int] = {}
        try:
            for eraser in self._erasers:
                for what, n in (await eraser(match)).items():
                    counts[what] = counts.get(what, 0) + n
        except Exception as exc:
            metrics.ERASURES.labels("state_unavailable").inc()
            log.warning(
                "audit: could not erase data subject %s from the state store (%s); "
                "trying again at the next checkpoint",
                ref,
                type(exc).__name__,
            )
            return None
        for what, n in counts.items():
            metrics.ERASED_STATE.labels(what).inc(n)
        return counts

    async def _record_erasure(self, ref: str, existed: bool, state: dict[str, int] | None) -> None:
        body = {"subject": ref, "key_destroyed": existed, "state": state}
        await self.append("erasure", body)
        if state is not None:
            metrics.ERASURES.labels("done").inc()
            log.info(
                "audit: erased data subject %s (key destroyed: %s; state store: %s)",
                ref,
                existed,
                ", ".join(f"{what} {n}" for what, n in sorted(state.items())) or "nothing kept",
            )

    async def _finish_noted_erasures(self) -> None:
        """Finish the erasures made while this process held the log (by the CLI), or left
        unfinished because the state store could not be reached."""
        if self._erasers_due:
            return  # the stores are still opening: the next checkpoint finishes them
        for ref in await self._blocking(self._subjects.forget_erased):
            # A key file removed without a note (an older CLI): erased all the same.
            await self._blocking(self._subjects.note_erasure, ref, True)
        for ref, noted in (await self._blocking(self._subjects.noted_erasures)).items():
            if ref in self._erasing:
                continue  # :meth:`erase` is at it and finishes its note itself
            self._erasing.add(ref)
            try:
                # The key too: the note may be all an erasure killed early left behind.
                destroy = functools.partial(_destroy_noted_key, self._layout.root)
                existed = bool(await self._blocking(destroy, self._subjects, ref)) or noted
                state = await self._erase_beyond(ref)
                if state is None:
                    continue  # the note stays: the next checkpoint tries again
                await self._record_erasure(ref, existed, state)
                await self._blocking(self._subjects.finish_erasure, ref)
            finally:
                self._erasing.discard(ref)

    def subject_ref(self, subject_id: str) -> str:
        """The pseudonymous reference that records use for ``subject_id``."""
        return self._subjects.ref(subject_id)

    def subject_refs(self, action: Action) -> tuple[str, ...]:
        """The references of every data subject the configured sources name in ``action``,
        for the stores beyond the log that keep the action (erasure finds them by these)."""
        sources = self._config.subjects.sources
        return tuple(self._subjects.ref(s) for s in subject_ids(action, sources))

    # -- internals -----------------------------------------------------------

    def _remember_redactions(self, decision_id: str, paths: tuple[str, ...]) -> None:
        memory = self._redactions
        memory[decision_id] = paths
        if len(memory) > _REDACTION_MEMORY:
            del memory[next(iter(memory))]

    async def _subject_key(self, action: Action) -> tuple[str | None, AESGCM | None]:
        """The action's subject reference and key.

        ``(None, None)``: no configured source names a subject. A reference
        without a key: the fields are personal but cannot be sealed (the key
        store is full, or the value cannot name a subject), so the caller
        records them redacted.
        """
        if not self._may_name_subject(action):
            return None, None
        value = subject_value(action, self._config.subjects.sources)
        if value is None:
            return None, None
        if value is UNUSABLE or not isinstance(value, str):
            metrics.SUBJECT_KEYS_REFUSED.labels("unusable").inc()
            return UNUSABLE_REF, None
        ref = self._subjects.ref(value)
        aead = self._subjects.cached(ref)
        if aead is None:
            self._check_writable()
            aead = await self._blocking(self._subjects.load_or_create, ref)
            if aead is None:
                metrics.SUBJECT_KEYS_REFUSED.labels("full").inc()
        return ref, aead

    def _may_name_subject(self, action: Action) -> bool:
        """False when every place a subject source looks is empty (the common case)."""
        roots = self._subject_roots
        return bool(
            ("context" in roots and action.context)
            or ("action" in roots and action.arguments)
            or ("agent" in roots and action.agent.claims)
        )

    def _io_call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the I/O thread, unless an earlier job there failed.

        Jobs already queued when one fails must not touch the disk either:
        after the first failure the log does no more I/O at all.
        """
        if self._io_failure is not None:
            raise OSError(errno.EIO, f"the audit log failed earlier: {self._io_failure}")
        try:
            return fn(*args)
        except Exception as exc:
            self._io_failure = exc
            raise

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        """Run blocking I/O on the log's thread; any failure fails the log closed."""
        try:
            return await self._io.call(self._io_call, fn, *args)
        except Exception as exc:
            self._fail(exc)
            raise AuditError(_FAILED) from exc

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise AuditError(_NOT_WRITABLE)
        if not self._accepting:
            raise AuditError("the audit log is closed")

    def _commit(
        self,
        kind: str,
        fields: dict[str, Any],
        subject: str | None,
        aead: AESGCM | None,
        personal: dict[str, Any],
        *,
        urgent: bool = True,
    ) -> tuple[RecordRef, asyncio.Future[None]]:
        """Number, chain, encode, hash and queue one record. Synchronous on purpose.

        ``urgent`` records start a batch at once. Others (outcomes: nothing
        waits on them before acting) wait up to ``COALESCE_S`` to share the
        next urgent batch's fsync, so they do not put a sync of their own in
        front of the next decision.

        No ``await`` may happen between taking the sequence number and
        queueing the frame: that is what keeps file order, chain order and
        tree order identical.
        """
        self._check_writable()
        seq = self._compact.size
        record_id = f"{self._id_prefix}{seq:010x}"
        record: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "id": record_id,
            "seq": seq,
            "time": self._clock.now(),
            "prev": self._last_hex,
            "kind": kind,
            "subject": subject,
            "sealed": None,
        }
        record.update(fields)
        if personal and aead is not None and subject is not None:
            record["sealed"] = self._subjects.seal(aead, subject, record_id, personal)
        try:
            payload = encode(record)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"the audit record cannot be encoded: {exc}") from exc
        if len(payload) > MAX_RECORD_BYTES:
            raise AuditError(f"the audit record is {len(payload)} bytes, over the limit")
        digest = leaf_hash(payload)
        self._compact.append(digest)
        self._last_hex = digest.hex()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._frames.append(frame(payload))
        self._records.append(record)
        self._waiters.append(fut)
        if not self._writing:
            if urgent:
                # From the next loop pass: records appended in this one join the batch.
                self._writing = True
                self._loop.call_soon(self._next_batch)
            elif self._coalesce is None:
                self._coalesce = self._loop.call_later(COALESCE_S, self._start_flush)
        return RecordRef(record_id, seq, self._last_hex), fut

    def _start_flush(self) -> None:
        """Hand the pending batch to the I/O thread, unless one is being written."""
        if self._coalesce is not None:
            self._coalesce.cancel()
            self._coalesce = None
        if self._writing or not self._frames:
            return
        frames, records, waiters = self._frames, self._records, self._waiters
        self._frames, self._records, self._waiters = [], [], []
        state = TreeState(self._compact.size, bytes.fromhex(self._last_hex), self._compact.hashes)
        self._writing = True
        self._inflight = records  # a reference, no copy: checkpoints read their stamps
        self._io.submit(
            self._io_call,
            (self._writer.write_batch, frames, state, self._sync_each_batch),
            functools.partial(self._written, waiters, records, state),
        )

    def _written(
        self,
        waiters: list[asyncio.Future[None]],
        records: list[Mapping[str, Any]],
        state: TreeState,
        _result: object,
        error: BaseException | None,
    ) -> None:
        """On the loop: a batch is durable (or failed); release its appenders."""
        self._inflight = []
        if error is not None:
            self._fail(error)
            for waiter in (*waiters, *self._waiters):
                if not waiter.done():
                    failed = AuditError(_FAILED)
                    failed.__cause__ = error  # for Warden's log; agents read only the message
                    waiter.set_exception(failed)
            self._frames, self._records, self._waiters = [], [], []
            self._writing = False
            self._wake_idle()
            return
        self._durable = state
        if self._sync_each_batch:
            self._synced = state.size
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()  # followers of the log (gRPC TailRecords) read on
        self._unsynced = not self._sync_each_batch
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        # Let the appenders just released queue their next records first, so
        # they join the next batch instead of trailing it in a batch of their
        # own (which would halve the records per fsync).
        self._loop.call_soon(self._next_batch)
        if self._followers:
            # After them and the next batch's start: no request waits for a follower.
            self._loop.call_soon(self._follow, state.size - len(records), records)

    def _follow(self, first: int, records: list[Mapping[str, Any]]) -> None:
        for follower in self._followers:
            try:
                follower(first, records)
            except Exception:
                log.exception("audit: a follower of the log failed on records %d..", first)

    def _next_batch(self) -> None:
        self._writing = False
        if self._frames:
            self._start_flush()
        else:
            self._wake_idle()

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = f"{type(exc).__name__}: {exc}"
            log.error(
                "audit: the log in %s failed and takes no more records; Warden fails closed "
                "until it is restarted on a healthy disk: %s",
                self._layout.root,
                self._failure,
            )

    async def _drain(self) -> None:
        """Wait until every queued record is written (or has failed)."""
        self._start_flush()  # records still waiting to coalesce go now
        if self._writing:
            idle: asyncio.Future[None] = self._loop.create_future()
            self._idle.append(idle)
            await idle

    # -- checkpoints ---------------------------------------------------------

    async def checkpoint(self, *, refresh: bool = False) -> Checkpoint | None:
        """Sign and store a checkpoint of every record written so far.

        Each carries a time (the extension line ``time <RFC 3339>``): when it
        was signed, or the time of the earliest record already stamped but not
        yet durable (so not in it) when that is earlier. Whoever checks an
        evidence package learns that no record dated before then is missing
        from it. Returns ``None`` when nothing was added since the last
        checkpoint, unless ``refresh``: then the last one is signed again with
        a new time, so a quiet log still vouches for the hours it had nothing
        to add. Raises :class:`AuditError` if the log failed or the
        checkpoint cannot be stored (which fails the log).
        """
        return await self._sign(refresh=refresh)

    async def _sign(self, *, refresh: bool, closing: bool = False) -> Checkpoint | None:
        """:meth:`checkpoint`; ``closing``: the last one, marked :data:`CLOSED`."""
        async with self._checkpoint_lock:
            if self._failure is not None:
                raise AuditError(_NOT_WRITABLE)
            state = self._durable
            if state.size < self._checkpointed or state.size == 0:
                return None
            if state.size == self._checkpointed and not refresh:
                return None
            # Records are stamped before they are durable (a batch being fsynced, outcomes
            # coalescing): those past ``state`` may be dated before now. The time must
            # not pass the earliest of them, or a period ending at it would lack them.
            # Only the in-flight batch and the pending one are not durable, and no
            # ``await`` since reading ``state`` let another record be stamped.
            signed = min(
                (self._clock.now(), *(r["time"] for r in (*self._inflight, *self._records)))
            )
            extensions = [f"{CHECKPOINT_TIME}{signed}"]
            if closing:
                extensions.append(CLOSED)
            # Every checkpoint of a run that resumed a closed log names it: whichever
            # of them is kept (elsewhere, in the central store) shows the resumption.
            extensions.extend(self._reopened)
            ckpt = Checkpoint(
                self._meta.origin, state.size, state.compact().root(), tuple(extensions)
            )
            note = self._signer.sign(ckpt.text())
            await self._blocking(self._store_checkpoint, state.size, note)
            self._checkpointed = state.size
            self._synced = max(self._synced, state.size)  # synced before it was signed
            return ckpt

    def _store_checkpoint(self, size: int, note: str) -> None:
        # The checkpoint vouches for records that must therefore be on disk first.
        self._writer.sync()
        self._layout.write_checkpoint(size, note)

    async def _checkpointer(self) -> None:
        while True:
            await asyncio.sleep(self._config.checkpoint_interval_s)
            try:
                # Signed again when nothing was added: a period that ended while the log
                # was quiet is then shown complete by a checkpoint from after its end.
                await self.checkpoint(refresh=True)
                await self._finish_noted_erasures()
            except AuditError:
                return

    async def _syncer(self) -> None:
        while True:
            await asyncio.sleep(BATCH_SYNC_INTERVAL_S)
            if self._unsynced and self._failure is None:
                self._unsynced = False
                upto = self._durable.size  # written before the sync: covered by it
                try:
                    await self._blocking(self._writer.sync)
                except AuditError:
                    return
                self._synced = max(self._synced, upto)

    # -- shutdown ------------------------------------------------------------

    async def close(self) -> None:
        """Flush pending records, sign a final checkpoint, release the directory."""
        if self._closed:
            return
        self._accepting = False
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drain()
        if self._failure is None:
            with contextlib.suppress(AuditError):  # already logged by _fail
                # Marked closed: the next start takes no record found after it.
                await self._sign(refresh=True, closing=True)
        try:
            healthy = self._io_failure is None
            await self._io.call(self._writer.close, healthy)
        except OSError as exc:
            self._fail(exc)
        finally:
            os.close(self._lock_fd)
            self._io.stop()
            self._closed = True
        log.info("audit: log %s closed at %d records", self.origin, self.size)
