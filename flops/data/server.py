"""Arrow Flight server for one node-local data directory, compatible with the original FLOps ML data server.

The directory holds `<tag>.<md5>.parquet` files. Clients list them with `list_flights` (criteria: JSON bytes
`{"data_tags": [...]}`), stream one with `do_get` (the ticket is the file name), upload with `do_put` (the
descriptor path names the tag; an original-style `<tag>.<anything>.parquet` name is accepted too) and remove
them with the `drop_dataset` action. `DataServer` runs the service for an agent and tells it when the
inventory changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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

OnChange = Callable[[dict[str, int]], None]


def is_valid_tag(tag: str) -> bool:
    """True if `tag` can name datasets (letters, digits, `_`, `-`; no dots, so names split unambiguously)."""
    return TAG_PATTERN.fullmatch(tag) is not None


def parse_dataset_file_name(name: str) -> tuple[str, str] | None:
    """Return (tag, md5) for a `<tag>.<md5>.parquet` name, None for anything else (temp files, paths)."""
    match = FILE_PATTERN.fullmatch(name)
    return (match["tag"], match["digest"]) if match else None


def table_digest(table: pa.Table) -> str:
    """md5 of the table's data, independent of how it was chunked in transit or of schema metadata.

    Hashing the data (not the parquet bytes) makes a repeated put of the same partition land on the same
    file name, so a retried push cannot duplicate rows.
    """
    table = table.replace_schema_metadata(None).combine_chunks()
    digest = hashlib.md5(usedforsecurity=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(sink.getvalue())
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


def _parse_tags(raw: bytes, *, what: str) -> list[str] | None:
    """Tags from JSON `{"data_tags": [...]}` bytes; None when the request names no tags."""
    if not raw.strip():
        return None
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f'{what} must be JSON like {{"data_tags": ["a"]}}: {exc}') from exc
    tags = payload.get("data_tags") if isinstance(payload, dict) else None
    if tags is None:
        if isinstance(payload, dict):
            return None
        raise ValueError(f'{what} must be a JSON object like {{"data_tags": ["a"]}}')
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"{what}: data_tags must be a list of strings, got {tags!r}")
    bad = [t for t in tags if not is_valid_tag(t)]
    if bad:
        raise ValueError(f"{what}: invalid data tags {bad!r} (allowed: letters, digits, '_' and '-')")
    return tags


def _descriptor_text(descriptor: flight.FlightDescriptor) -> str:
    raw = descriptor.path[0] if descriptor.path else descriptor.command
    if not raw:
        raise ValueError("descriptor must name a data tag")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("descriptor is not UTF-8") from exc


def _tag_from_put_descriptor(descriptor: flight.FlightDescriptor) -> str:
    """The tag a put targets: a bare tag, or the tag of an original-style `<tag>.<md5>.parquet` name."""
    text = _descriptor_text(descriptor)
    tag = text.split(".", 1)[0] if text.endswith(".parquet") else text
    if not is_valid_tag(tag):
        raise ValueError(f"invalid data tag {tag!r} (allowed: letters, digits, '_' and '-')")
    return tag


class DataFlightService(flight.FlightServerBase):
    """The Flight RPC handlers over one data directory; gRPC runs them on its own worker threads."""

    def __init__(self, data_dir: Path, bind: str, on_change: Callable[[], None]) -> None:
        super().__init__(bind)
        self._dir = data_dir
        self._on_change = on_change
        self._log = structlog.get_logger().bind(data_dir=str(data_dir))

    # -- naming -------------------------------------------------------------------------------------------
    def _resolve(self, name: str) -> Path:
        """Path of an existing dataset file; only bare `<tag>.<md5>.parquet` names are accepted.

        Prevents path traversal: `../x`, absolute paths and any name with a separator never match the
        pattern, so a ticket can only ever address a file directly inside the data directory.
        """
        if parse_dataset_file_name(name) is None:
            self._log.warning("dataset.rejected", name=name, reason="not a dataset file name")
            raise ValueError(f"not a dataset file name: {name!r}")
        path = self._dir / name
        if not path.is_file():
            raise KeyError(f"no dataset named {name!r}")
        return path

    def _flight_info(self, path: Path) -> flight.FlightInfo:
        with pq.ParquetFile(path) as parquet_file:
            schema, rows = parquet_file.schema_arrow, parquet_file.metadata.num_rows
        # No locations: per the Flight spec the ticket is then redeemable at the server that was asked,
        # which stays correct when the server binds 0.0.0.0 or sits behind NAT.
        endpoint = flight.FlightEndpoint(path.name.encode(), [])
        descriptor = flight.FlightDescriptor.for_path(path.name)
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, path.stat().st_size)

    # -- Flight RPCs --------------------------------------------------------------------------------------
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        tags = _parse_tags(criteria or b"", what="criteria")
        wanted = set(tags) if tags else None
        for path in dataset_files(self._dir):
            tag, _ = parse_dataset_file_name(path.name) or ("", "")
            if wanted is not None and tag not in wanted:
                continue
            try:
                info = self._flight_info(path)
            except (OSError, pa.ArrowException) as exc:
                # Dropped between listing and reading, or unreadable: skip rather than fail the listing.
                self._log.warning("dataset.unreadable", file=path.name, error=str(exc))
                continue
            yield info

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        return self._flight_info(self._resolve(_descriptor_text(descriptor)))

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        try:
            name = ticket.ticket.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("ticket is not UTF-8") from exc
        path = self._resolve(name)
        parquet_file = pq.ParquetFile(path)
        self._log.info("dataset.get", file=name, rows=parquet_file.metadata.num_rows)
        # Stream batch by batch so a large partition never sits in server memory whole.
        return flight.GeneratorStream(parquet_file.schema_arrow, parquet_file.iter_batches())

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        tag = _tag_from_put_descriptor(descriptor)
        table = reader.read_all()
        name = f"{tag}.{table_digest(table)}.parquet"
        target = self._dir / name
        created = not target.exists()
        if created:
            self._write_atomically(table, target)
        self._log.info("dataset.put", tag=tag, file=name, rows=table.num_rows, created=created)
        if created:
            # Before replying, so a client whose put returned can rely on the listener having run.
            self._on_change()
        writer.write(pa.py_buffer(json.dumps({"name": name, "rows": table.num_rows}).encode()))

    def _write_atomically(self, table: pa.Table, target: Path) -> None:
        """Write to a hidden temp file, fsync, then rename: readers never see a half-written dataset."""
        tmp = self._dir / f"{_TEMP_PREFIX}{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        try:
            with tmp.open("wb") as sink:
                pq.write_table(table, sink)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [
            (
                DROP_DATASET,
                'Delete datasets. Body: a file name, a tag, or JSON {"data_tags": [...]}. '
                'Result: JSON {"dropped": [file names]}.',
            )
        ]

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterable[bytes]:
        if action.type != DROP_DATASET:
            raise ValueError(f"unknown action {action.type!r}; supported: {DROP_DATASET}")
        dropped = self._drop(action.body.to_pybytes() if action.body else b"")
        if dropped:
            self._on_change()
        return [json.dumps({"dropped": dropped}).encode()]

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


class DataServer:
    """Runs the data service for one directory: `start()` binds (port 0 picks a free port), `stop()` ends it.

    `on_change(inventory)` is called after a put that created a file or a drop that removed one, from a
    gRPC worker thread, so the callback should only hand the new inventory over (e.g. enqueue it).
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_change: OnChange | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.on_change = on_change
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
        """The `grpc+tcp://host:port` URI clients connect to."""
        return flight.Location.for_grpc_tcp(self._advertise_host, self.port).uri.decode()

    def start(self) -> None:
        """Bind and serve; returns at once because gRPC serves from its own threads after binding."""
        if self._service is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A crash mid-put leaves its temp file behind; nothing can still be writing it now.
        for stale in self.data_dir.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        bind = flight.Location.for_grpc_tcp(self.host, self._port)
        self._service = DataFlightService(self.data_dir, bind.uri.decode(), self._notify)
        self._log.info("data_server.started", location=self.location, tags=self.inventory())

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
