"""Client for a node's Arrow Flight data server: list, fetch, put and drop datasets by data tag.

Every call carries a deadline, and Flight/gRPC failures surface as the small `DataError` family below with
the server's own message, so callers (learners, the mock provider, the agent) can tell "server down" from
"request refused" from "no such data" from "not allowed". Every call sends the client's bearer token; with a
CA file the client speaks TLS (the server's location is then `grpc+tls://`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import structlog

from flops.data.server import DROP_DATASET, NOT_FOUND, is_valid_tag, parse_dataset_file_name

DEFAULT_TIMEOUT_S = 30.0
# How an agent hands a learner its project's read token and the CA of the node's certificate (also read by
# flops_utils.ml_repo_building_blocks.load_dataset, inside ML repositories).
DATA_TOKEN_ENV = "FLOPS_DATA_TOKEN"
TLS_CA_ENV = "FLOPS_TLS_CA_FILE"


class DataError(Exception):
    """A data-server call failed; `location` names the server."""

    def __init__(self, message: str, *, location: str) -> None:
        super().__init__(message)
        self.location = location


class DataServerUnavailable(DataError):
    """The server could not be reached or did not answer before the deadline."""


class DataRequestRejected(DataError):
    """The server refused the request as invalid (bad tag, bad criteria, a name outside the directory)."""


class DatasetNotFound(DataError):
    """No dataset matched the requested tags or name."""


class DataAccessDenied(DataError):
    """No valid token, or a token that does not allow this call (a read token putting or dropping data)."""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset file as the server lists it."""

    name: str
    tag: str
    rows: int
    size_bytes: int
    schema: pa.Schema
    ticket: bytes


def _server_message(exc: BaseException) -> str:
    # pyarrow appends the server-side Python traceback after ". Detail:"; the first part is the message.
    return str(exc).split(". Detail:", 1)[0].strip()


def _checked_tags(tags: Iterable[str] | None, *, location: str) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str):
        tags = [tags]
    tags = list(tags)
    bad = [t for t in tags if not isinstance(t, str) or not is_valid_tag(t)]
    if bad:
        raise DataRequestRejected(
            f"invalid data tags {bad!r} (allowed: letters, digits, '_' and '-')", location=location
        )
    return tags


def _chunk_rows(table: pa.Table, target_bytes: int = 8 * 1024 * 1024) -> int:
    """Rows per uploaded batch so a batch is about `target_bytes`."""
    per_row = table.nbytes / table.num_rows if table.num_rows else 1
    return max(1, int(target_bytes / max(per_row, 1)))


class DataClient:
    """Talks to one data server at `location` (`grpc+tcp://host:port`); usable as a context manager.

    `token` is sent with every call (the node's admin token, or a project's read token); `ca_file` is the CA
    that signed a TLS server's certificate.
    """

    def __init__(
        self,
        location: str | flight.Location,
        *,
        token: str | None = None,
        ca_file: Path | str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.location = location.uri.decode() if isinstance(location, flight.Location) else str(location)
        self.timeout = timeout
        self._headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        root_certs = Path(ca_file).read_bytes() if ca_file else None
        self._client = flight.FlightClient(self.location, tls_root_certs=root_certs)
        self._log = structlog.get_logger().bind(data_server=self.location)

    def _options(self) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(timeout=self.timeout, headers=self._headers)

    @contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        """Translate Flight/gRPC errors raised inside the block into `DataError`s naming the operation."""
        where = f"data server {self.location}: {operation}"
        try:
            yield
        except flight.FlightTimedOutError as exc:
            raise DataServerUnavailable(f"{where} timed out after {self.timeout}s", location=self.location) from exc
        except flight.FlightUnavailableError as exc:
            raise DataServerUnavailable(f"{where} unavailable: {_server_message(exc)}", location=self.location) from exc
        except (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError) as exc:
            raise DataAccessDenied(f"{where} refused: {_server_message(exc)}", location=self.location) from exc
        except flight.FlightServerError as exc:
            # The server says what kind of refusal it is in extra_info (see flops.data.server).
            kind = (
                DatasetNotFound if exc.extra_info == NOT_FOUND else DataRequestRejected if exc.extra_info else DataError
            )
            raise kind(f"{where}: {_server_message(exc)}", location=self.location) from exc
        except KeyError as exc:  # the server's KeyError arrives as pyarrow.ArrowKeyError
            raise DatasetNotFound(f"{where}: {_server_message(exc)}", location=self.location) from exc
        except (ValueError, pa.ArrowInvalid) as exc:  # the server's ValueError arrives as ArrowInvalid
            raise DataRequestRejected(f"{where}: {_server_message(exc)}", location=self.location) from exc
        except pa.ArrowException as exc:
            raise DataError(f"{where} failed: {_server_message(exc)}", location=self.location) from exc

    def list(self, tags: Iterable[str] | None = None) -> list[DatasetInfo]:
        """Datasets whose tag is in `tags` (all datasets when `tags` is None or empty)."""
        wanted = _checked_tags(tags, location=self.location)
        criteria = json.dumps({"data_tags": wanted or []}).encode()
        infos = []
        with self._call("list"):
            for info in self._client.list_flights(criteria, options=self._options()):
                name = info.descriptor.path[0].decode()
                tag, _ = parse_dataset_file_name(name) or (name.split(".", 1)[0], "")
                infos.append(
                    DatasetInfo(
                        name=name,
                        tag=tag,
                        rows=info.total_records,
                        size_bytes=info.total_bytes,
                        schema=info.schema,
                        ticket=info.endpoints[0].ticket.ticket,
                    )
                )
        return infos

    def fetch(self, tags: Iterable[str] | None = None) -> pa.Table:
        """All datasets with a matching tag as one table; schemas are unified (missing columns become null).

        Raises `DatasetNotFound` when nothing matches, so a learner fails with a reason instead of
        training on zero rows.
        """
        wanted = _checked_tags(tags, location=self.location)
        infos = self.list(wanted)
        if not infos:
            raise DatasetNotFound(
                f"data server {self.location}: no datasets with tags {wanted or 'any'}",
                location=self.location,
            )
        tables = []
        for info in infos:
            with self._call(f"get {info.name}"):
                tables.append(self._client.do_get(flight.Ticket(info.ticket), self._options()).read_all())
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            names = [i.name for i in infos]
            raise DataError(
                f"data server {self.location}: datasets {names} have incompatible schemas: {exc}",
                location=self.location,
            ) from exc
        self._log.info("data.fetched", tags=wanted, files=len(infos), rows=table.num_rows)
        return table

    def put(self, tag: str, table: pa.Table) -> str:
        """Store `table` under `tag`; returns the stored file name (`<tag>.<md5>.parquet`).

        Putting the same data again is a no-op on the server and returns the same name.
        """
        _checked_tags([tag], location=self.location)
        descriptor = flight.FlightDescriptor.for_path(tag)
        with self._call(f"put {tag}"):
            writer, metadata_reader = self._client.do_put(descriptor, table.schema, self._options())
            with writer:
                # Moderate batches: the server checks its upload limit batch by batch.
                writer.write_table(table, max_chunksize=_chunk_rows(table))
                writer.done_writing()
                reply = metadata_reader.read()
        if reply is None:
            raise DataError(f"data server {self.location}: put {tag} got no reply", location=self.location)
        name = json.loads(reply.to_pybytes())["name"]
        self._log.info("data.put", tag=tag, file=name, rows=table.num_rows)
        return name

    def drop(self, tags: Iterable[str]) -> list[str]:
        """Delete every dataset with one of `tags`; returns the removed file names (empty if none)."""
        wanted = _checked_tags(tags, location=self.location) or []
        if not wanted:
            return []
        body = json.dumps({"data_tags": wanted}).encode()
        dropped: list[str] = []
        with self._call(f"drop {wanted}"):
            for result in self._client.do_action(flight.Action(DROP_DATASET, body), self._options()):
                dropped.extend(json.loads(result.body.to_pybytes())["dropped"])
        self._log.info("data.dropped", tags=wanted, files=dropped)
        return dropped

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
