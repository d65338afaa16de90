"""Arrow Flight server for one node-local data directory, compatible with the original FLOps ML data server.

The directory holds `<tag>.<md5>.parquet` files. Clients list them with `list_flights` (criteria: JSON bytes
`{"data_tags": [...]}`), stream one with `do_get` (the ticket is the file name), upload with `do_put` (the
descriptor path names the tag; an original-style `<tag>.<anything>.parquet` name is accepted too) and remove
them with the `drop_dataset` action. `DataServer` runs the service for an agent and tells it when the
inventory changed.

Every call needs a bearer token (`authorization: Bearer <token>` header, checked by a server middleware):
the node's admin token may do everything; a project read token, granted by the agent for one learner, may
only list and read its project's data tags. Uploads are streamed to disk and refused past a size limit.
Errors reach clients as short messages; details (tracebacks, paths) stay in the server's log. With a
certificate and key configured the server speaks TLS (`grpc+tls://`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import structlog

DROP_DATASET = "drop_dataset"
TAG_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# The tag is everything before the first dot, as in the original server; the md5 keeps names unique per data.
FILE_PATTERN = re.compile(r"(?P<tag>[A-Za-z0-9_-]+)\.(?P<digest>[0-9a-f]{32})\.parquet")
_TEMP_PREFIX = ".put-"
_TEMP_SUFFIX = ".tmp"
ADMIN_TOKEN_FILE = "data-admin.token"
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
_AUTH = "auth"
# The digest hashes the data in slices of this many rows, whatever the batches it arrived in.
_DIGEST_ROWS = 1024
_INDICES = pa.array(range(_DIGEST_ROWS))
# What kind of refusal a FlightServerError carries (its extra_info), so clients can tell them apart.
INVALID = b"invalid"
NOT_FOUND = b"not_found"
TOO_LARGE = b"too_large"

OnChange = Callable[[dict[str, int]], None]
_F = TypeVar("_F", bound=Callable[..., Any])


def is_valid_tag(tag: str) -> bool:
    """True if `tag` can name datasets (letters, digits, `_`, `-`; no dots, so names split unambiguously)."""
    return TAG_PATTERN.fullmatch(tag) is not None


def parse_dataset_file_name(name: str) -> tuple[str, str] | None:
    """Return (tag, md5) for a `<tag>.<md5>.parquet` name, None for anything else (temp files, paths)."""
    match = FILE_PATTERN.fullmatch(name)
    return (match["tag"], match["digest"]) if match else None


class _Md5Sink:
    """A write-only file object that only feeds an md5."""

    closed = False

    def __init__(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)

    def write(self, data: bytes) -> int:
        self.md5.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class StreamDigest:
    """md5 of a table's data fed batch by batch, independent of how it was chunked and of schema metadata.

    Hashing the data (not the parquet bytes) makes a repeated put of the same partition land on the same
    file name, so a retried push cannot duplicate rows. Rows are hashed in fresh slices of `_DIGEST_ROWS`
    (Arrow's IPC bytes of a sliced array depend on its parent), so at most one slice is held at a time.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema.remove_metadata()
        self._sink = _Md5Sink()
        self._writer = pa.ipc.new_stream(pa.PythonFile(self._sink, mode="w"), self._schema)
        self._pending: deque[pa.RecordBatch] = deque()
        self._rows = 0

    def update(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._rows += batch.num_rows
        self._drain(final=False)

    def hexdigest(self) -> str:
        self._drain(final=True)
        self._writer.close()
        return self._sink.md5.hexdigest()

    def _drain(self, *, final: bool) -> None:
        while self._rows >= _DIGEST_ROWS or (final and self._rows):
            size = min(_DIGEST_ROWS, self._rows)
            pieces, need = [], size
            while need:
                batch = self._pending[0]
                if batch.num_rows <= need:
                    pieces.append(self._pending.popleft())
                    need -= batch.num_rows
                else:
                    pieces.append(batch.slice(0, need))
                    self._pending[0] = batch.slice(need)
                    need = 0
            self._rows -= size
            rows = pa.Table.from_batches(pieces, self._schema)
            # take() builds compact arrays, so equal rows serialize to equal bytes.
            self._writer.write_table(rows.take(_INDICES if size == _DIGEST_ROWS else pa.array(range(size))))


def table_digest(table: pa.Table) -> str:
    """md5 of the table's data, as `StreamDigest` computes it for an upload of the same rows."""
    digest = StreamDigest(table.schema)
    for batch in table.to_batches():
        digest.update(batch)
    return digest.hexdigest()


def dataset_files(data_dir: Path) -> list[Path]:
    """The dataset files in `data_dir`, sorted by name; temp files and foreign files are skipped."""
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if p.is_file() and parse_dataset_file_name(p.name) is not None)


def inventory(data_dir: Path | str) -> dict[str, int]:
    """Rows held per data tag in `data_dir`, read from parquet footers only (no data is loaded)."""
    log = structlog.get_logger().bind(data_dir=str(data_dir))
    rows: dict[str, int] = {}
    for path in dataset_files(Path(data_dir)):
        tag, _ = parse_dataset_file_name(path.name) or ("", "")
        try:
            rows[tag] = rows.get(tag, 0) + pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as exc:
            # One unreadable file must not hide the others from the agent's advertised tags.
            log.warning("dataset.unreadable", file=path.name, error=str(exc))
    return rows


class Refusal(Exception):
    """An expected refusal: its message goes to the client as is, `kind` says what sort (INVALID, …)."""

    def __init__(self, message: str, kind: bytes = INVALID) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Caller:
    """Who is calling: the node admin, or a project holding a read token for some data tags."""

    admin: bool
    project_id: str | None = None
    tags: frozenset[str] = frozenset()

    def may_read(self, tag: str) -> bool:
        return self.admin or tag in self.tags


class DataAccess:
    """The tokens a data server accepts: one admin token, and read tokens granted per project.

    Grants live in memory only: a restarted agent no longer runs its learners, so nothing needs them.
    """

    def __init__(self, admin_token: str) -> None:
        if len(admin_token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        self._admin = admin_token.encode()
        self._grants: dict[str, Caller] = {}
        self._lock = threading.Lock()

    def grant(self, project_id: str, token: str, tags: Iterable[str]) -> None:
        """Let `token` list and read `tags` (nothing else) until `revoke(project_id)`."""
        if len(token) < 16:
            raise ValueError("a data token must be at least 16 characters")
        if hmac.compare_digest(token.encode(), self._admin):
            raise ValueError("a project token cannot be the admin token")
        with self._lock:
            self._grants[token] = Caller(admin=False, project_id=project_id, tags=frozenset(tags))

    def revoke(self, project_id: str) -> int:
        """Forget every token granted to `project_id`; returns how many there were."""
        with self._lock:
            gone = [t for t, c in self._grants.items() if c.project_id == project_id]
            for token in gone:
                del self._grants[token]
        return len(gone)

    def caller(self, token: str) -> Caller | None:
        if hmac.compare_digest(token.encode(), self._admin):
            return Caller(admin=True)
        with self._lock:
            return self._grants.get(token)


def load_or_create_admin_token(state_dir: Path) -> str:
    """The node's data admin token from `state_dir/data-admin.token`, created (mode 0600) if absent."""
    path = state_dir / ADMIN_TOKEN_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if len(token) >= 16:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)  # empty or truncated by a crash: replace it
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)
    return token


class _Authenticated(flight.ServerMiddleware):
    def __init__(self, caller: Caller) -> None:
        self.caller = caller


class _BearerAuth(flight.ServerMiddlewareFactory):
    """Checks the `authorization: Bearer <token>` header of every call before any handler runs."""

    def __init__(self, access: DataAccess) -> None:
        self._access = access

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> flight.ServerMiddleware:
        values = headers.get("authorization") or []
        scheme, _, token = (values[0] if values else "").partition(" ")
        caller = self._access.caller(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if caller is None:
            raise flight.FlightUnauthenticatedError("a valid data token is required (authorization: Bearer …)")
        return _Authenticated(caller)


def _shielded(method: _F) -> _F:
    """Turn whatever a handler raises into a short Flight error; details go to the server's log only."""

    @functools.wraps(method)
    def wrapper(self: DataFlightService, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except flight.FlightError:
            raise
        except Refusal as exc:
            raise flight.FlightServerError(str(exc), extra_info=exc.kind) from None
        except Exception:
            self._log.exception("data_server.call_failed", call=method.__name__)
            raise flight.FlightServerError("data server error (see its log)") from None

    return wrapper  # type: ignore[return-value]


def _parse_tags(raw: bytes, *, what: str) -> list[str] | None:
    """Tags from JSON `{"data_tags": [...]}` bytes; None when the request names no tags."""
    if not raw.strip():
        return None
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refusal(f'{what} must be JSON like {{"data_tags": ["a"]}}: {exc}') from exc
    tags = payload.get("data_tags") if isinstance(payload, dict) else None
    if tags is None:
        if isinstance(payload, dict):
            return None
        raise Refusal(f'{what} must be a JSON object like {{"data_tags": ["a"]}}')
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise Refusal(f"{what}: data_tags must be a list of strings, got {tags!r}")
    bad = [t for t in tags if not is_valid_tag(t)]
    if bad:
        raise Refusal(f"{what}: invalid data tags {bad!r} (allowed: letters, digits, '_' and '-')")
    return tags


def _descriptor_text(descriptor: flight.FlightDescriptor) -> str:
    raw = descriptor.path[0] if descriptor.path else descriptor.command
    if not raw:
        raise Refusal("descriptor must name a data tag")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal("descriptor is not UTF-8") from exc


def _tag_from_put_descriptor(descriptor: flight.FlightDescriptor) -> str:
    """The tag a put targets: a bare tag, or the tag of an original-style `<tag>.<md5>.parquet` name."""
    text = _descriptor_text(descriptor)
    tag = text.split(".", 1)[0] if text.endswith(".parquet") else text
    if not is_valid_tag(tag):
        raise Refusal(f"invalid data tag {tag!r} (allowed: letters, digits, '_' and '-')")
    return tag


class DataFlightService(flight.FlightServerBase):
    """The Flight RPC handlers over one data directory; gRPC runs them on its own worker threads."""

    def __init__(
        self,
        data_dir: Path,
        bind: str,
        on_change: Callable[[], None],
        access: DataAccess,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        tls_certificates: list[flight.CertKeyPair] | None = None,
    ) -> None:
        super().__init__(bind, tls_certificates=tls_certificates, middleware={_AUTH: _BearerAuth(access)})
        self._dir = data_dir
        self._on_change = on_change
        self._max_upload_bytes = max_upload_bytes
        self._log = structlog.get_logger().bind(data_dir=str(data_dir))

    # -- access -------------------------------------------------------------------------------------------
    @staticmethod
    def _caller(context: flight.ServerCallContext) -> Caller:
        middleware = context.get_middleware(_AUTH)
        if not isinstance(middleware, _Authenticated):  # the middleware refuses such calls; never reached
            raise flight.FlightUnauthenticatedError("a valid data token is required")
        return middleware.caller

    def _require_admin(self, context: flight.ServerCallContext, what: str) -> None:
        caller = self._caller(context)
        if not caller.admin:
            self._log.warning("data_server.refused", call=what, project_id=caller.project_id)
            raise flight.FlightUnauthorizedError(f"{what} needs the node's admin token")

    def _require_read(self, caller: Caller, tag: str) -> None:
        if not caller.may_read(tag):
            self._log.warning("data_server.refused", call="read", tag=tag, project_id=caller.project_id)
            raise flight.FlightUnauthorizedError(f"this token may not read data tag {tag!r}")

    # -- naming -------------------------------------------------------------------------------------------
    def _resolve(self, name: str) -> Path:
        """Path of an existing dataset file; only bare `<tag>.<md5>.parquet` names are accepted.

        Prevents path traversal: `../x`, absolute paths and any name with a separator never match the
        pattern, so a ticket can only ever address a file directly inside the data directory.
        """
        if parse_dataset_file_name(name) is None:
            self._log.warning("dataset.rejected", name=name, reason="not a dataset file name")
            raise Refusal(f"not a dataset file name: {name!r}")
        path = self._dir / name
        if not path.is_file():
            raise Refusal(f"no dataset named {name!r}", NOT_FOUND)
        return path

    def _readable(self, context: flight.ServerCallContext, name: str) -> Path:
        """The dataset file `name`, if the caller may read its tag (checked before it is looked up)."""
        parsed = parse_dataset_file_name(name)
        if parsed is not None:
            self._require_read(self._caller(context), parsed[0])
        return self._resolve(name)

    def _flight_info(self, path: Path) -> flight.FlightInfo:
        with pq.ParquetFile(path) as parquet_file:
            schema, rows = parquet_file.schema_arrow, parquet_file.metadata.num_rows
        # No locations: per the Flight spec the ticket is then redeemable at the server that was asked,
        # which stays correct when the server binds 0.0.0.0 or sits behind NAT.
        endpoint = flight.FlightEndpoint(path.name.encode(), [])
        descriptor = flight.FlightDescriptor.for_path(path.name)
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, path.stat().st_size)

    # -- Flight RPCs --------------------------------------------------------------------------------------
    @_shielded
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> list[flight.FlightInfo]:
        caller = self._caller(context)
        tags = _parse_tags(criteria or b"", what="criteria")
        for tag in tags or []:
            self._require_read(caller, tag)
        # A project token asking for everything sees its own tags only.
        wanted = set(tags) if tags else (None if caller.admin else set(caller.tags))
        infos = []
        for path in dataset_files(self._dir):
            tag, _ = parse_dataset_file_name(path.name) or ("", "")
            if wanted is not None and tag not in wanted:
                continue
            try:
                infos.append(self._flight_info(path))
            except (OSError, pa.ArrowException) as exc:
                # Dropped between listing and reading, or unreadable: skip rather than fail the listing.
                self._log.warning("dataset.unreadable", file=path.name, error=str(exc))
        return infos

    @_shielded
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        return self._flight_info(self._readable(context, _descriptor_text(descriptor)))

    @_shielded
    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(self._flight_info(self._readable(context, _descriptor_text(descriptor))).schema)

    @_shielded
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        try:
            name = ticket.ticket.decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal("ticket is not UTF-8") from None
        path = self._readable(context, name)
        parquet_file = pq.ParquetFile(path)
        self._log.info("dataset.get", file=name, rows=parquet_file.metadata.num_rows)
        # Stream batch by batch so a large partition never sits in server memory whole.
        return flight.GeneratorStream(parquet_file.schema_arrow, self._batches(parquet_file, name))

    def _batches(self, parquet_file: pq.ParquetFile, name: str) -> Iterator[pa.RecordBatch]:
        try:
            yield from parquet_file.iter_batches()
        except Exception:
            self._log.exception("dataset.get_failed", file=name)
            raise flight.FlightServerError("data server error while reading (see its log)") from None
        finally:
            parquet_file.close()

    @_shielded
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        self._require_admin(context, "put")
        tag = _tag_from_put_descriptor(descriptor)
        tmp = self._dir / f"{_TEMP_PREFIX}{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        try:
            digest, rows = self._receive(reader, tmp, tag)
            name = f"{tag}.{digest}.parquet"
            target = self._dir / name
            created = not target.exists()
            if created:
                os.replace(tmp, target)  # readers never see a half-written dataset
        finally:
            tmp.unlink(missing_ok=True)
        self._log.info("dataset.put", tag=tag, file=name, rows=rows, created=created)
        if created:
            # Before replying, so a client whose put returned can rely on the listener having run.
            self._on_change()
        writer.write(pa.py_buffer(json.dumps({"name": name, "rows": rows}).encode()))

    def _receive(self, reader: flight.MetadataRecordBatchReader, tmp: Path, tag: str) -> tuple[str, int]:
        """Write the upload to `tmp` batch by batch (never whole in memory), fsync it; (md5, rows).

        Refused as soon as the batches received exceed the upload limit.
        """
        limit = self._max_upload_bytes
        schema = reader.schema
        digest = StreamDigest(schema)
        received = rows = 0
        with tmp.open("wb") as sink:
            with pq.ParquetWriter(sink, schema) as parquet_writer:
                for chunk in reader:
                    batch = chunk.data
                    if batch is None:
                        continue
                    received += batch.get_total_buffer_size()
                    if received > limit:
                        self._log.warning("dataset.put_refused", tag=tag, limit_bytes=limit, reason="too large")
                        raise Refusal(
                            f"upload exceeds the data server's limit of {limit / 2**20:g} MB "
                            "(FLOPS_DATA_MAX_UPLOAD_MB on the node)",
                            TOO_LARGE,
                        )
                    parquet_writer.write_batch(batch)
                    digest.update(batch)
                    rows += batch.num_rows
            sink.flush()
            os.fsync(sink.fileno())
        return digest.hexdigest(), rows

    @_shielded
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [
            (
                DROP_DATASET,
                'Delete datasets (admin token only). Body: a file name, a tag, or JSON {"data_tags": [...]}. '
                'Result: JSON {"dropped": [file names]}.',
            )
        ]

    @_shielded
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[bytes]:
        if action.type != DROP_DATASET:
            raise Refusal(f"unknown action {action.type!r}; supported: {DROP_DATASET}")
        self._require_admin(context, DROP_DATASET)
        dropped = self._drop(action.body.to_pybytes() if action.body else b"")
        if dropped:
            self._on_change()
        return [json.dumps({"dropped": dropped}).encode()]

    @_shielded
    def do_exchange(self, context: flight.ServerCallContext, *args: Any) -> None:
        raise Refusal("do_exchange is not supported")

    def _drop(self, body: bytes) -> list[str]:
        """Remove the files the body names; already-absent files are not an error, so retries are safe."""
        text = body.decode("utf-8", errors="replace").strip()
        if parse_dataset_file_name(text) is not None:
            targets = [self._dir / text]  # the original server's form: one exact file name
        elif is_valid_tag(text):
            targets = [p for p in dataset_files(self._dir) if p.name.startswith(f"{text}.")]
        else:
            # An empty tag list drops nothing: "drop everything" must never be an accident.
            tags = set(_parse_tags(body, what="drop_dataset body") or [])
            targets = [p for p in dataset_files(self._dir) if (parse_dataset_file_name(p.name) or ("",))[0] in tags]
        dropped = []
        for path in targets:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            dropped.append(path.name)
        self._log.info("dataset.drop", files=dropped)
        return dropped


@dataclass(frozen=True)
class TlsFiles:
    """The PEM certificate (chain) and private key a server presents; configured = TLS."""

    cert_file: Path
    key_file: Path

    def pair(self) -> flight.CertKeyPair:
        return flight.CertKeyPair(cert=Path(self.cert_file).read_bytes(), key=Path(self.key_file).read_bytes())


class DataServer:
    """Runs the data service for one directory: `start()` binds (port 0 picks a free port), `stop()` ends it.

    `admin_token` (random when not given) may do everything; `grant()` adds a project's read token and
    `revoke()` removes it. `on_change(inventory)` is called after a put that created a file or a drop that
    removed one, from a gRPC worker thread, so the callback should only hand the new inventory over (e.g.
    enqueue it).
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_change: OnChange | None = None,
        advertise_host: str | None = None,
        admin_token: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        tls: TlsFiles | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.on_change = on_change
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        self.access = DataAccess(self.admin_token)
        self.max_upload_bytes = max_upload_bytes
        self.tls = tls
        self._port = port
        # A wildcard bind is not a connectable address; local clients reach it through loopback.
        self._advertise_host = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
        self._service: DataFlightService | None = None
        self._log = structlog.get_logger().bind(data_dir=str(self.data_dir))

    @property
    def port(self) -> int:
        if self._service is None:
            raise RuntimeError("data server is not started")
        return self._service.port

    @property
    def location(self) -> str:
        """The `grpc+tcp://host:port` (or `grpc+tls://`) URI clients connect to."""
        return self._uri(self._advertise_host, self.port)

    def _uri(self, host: str, port: int) -> str:
        make = flight.Location.for_grpc_tls if self.tls else flight.Location.for_grpc_tcp
        return make(host, port).uri.decode()

    def grant(self, project_id: str, token: str, tags: Iterable[str]) -> None:
        """Let `token` list and read `tags` until `revoke(project_id)`."""
        tags = sorted(tags)
        self.access.grant(project_id, token, tags)
        self._log.info("data_server.granted", project_id=project_id, tags=tags)

    def revoke(self, project_id: str) -> None:
        if self.access.revoke(project_id):
            self._log.info("data_server.revoked", project_id=project_id)

    def start(self) -> None:
        """Bind and serve; returns at once because gRPC serves from its own threads after binding."""
        if self._service is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A crash mid-put leaves its temp file behind; nothing can still be writing it now.
        for stale in self.data_dir.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        self._service = DataFlightService(
            self.data_dir,
            self._uri(self.host, self._port),
            self._notify,
            self.access,
            max_upload_bytes=self.max_upload_bytes,
            tls_certificates=[self.tls.pair()] if self.tls else None,
        )
        self._log.info("data_server.started", location=self.location, tls=bool(self.tls), tags=self.inventory())

    def stop(self) -> None:
        """Stop accepting calls and wait for the running ones to finish."""
        service, self._service = self._service, None
        if service is None:
            return
        service.shutdown()
        service.wait()
        self._log.info("data_server.stopped")

    def inventory(self) -> dict[str, int]:
        return inventory(self.data_dir)

    def _notify(self) -> None:
        callback = self.on_change
        if callback is None:
            return
        try:
            callback(self.inventory())
        except Exception:
            # The data is already stored; a failing listener must not turn the put into an error.
            self._log.exception("data_server.on_change_failed")

    def __enter__(self) -> DataServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
