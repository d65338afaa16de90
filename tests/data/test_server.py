"""Tests for the node-local Arrow Flight data server and its client, against a real server on a free port."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from flops.data.client import (
    DataClient,
    DataRequestRejected,
    DataServerUnavailable,
    DatasetNotFound,
)
from flops.data.server import DataServer, inventory, parse_dataset_file_name, table_digest


@pytest.fixture
def changes() -> list[dict[str, int]]:
    return []


@pytest.fixture
def server(tmp_path: Path, changes: list[dict[str, int]]) -> Iterator[DataServer]:
    data_server = DataServer(tmp_path / "data", port=0, on_change=changes.append)
    data_server.start()
    yield data_server
    data_server.stop()


@pytest.fixture
def client(server: DataServer) -> Iterator[DataClient]:
    with DataClient(server.location, token=server.admin_token, timeout=10) as data_client:
        yield data_client


def _admin(server: DataServer) -> flight.FlightCallOptions:
    """Call options a raw Flight client (an original FLOps client) sends with the node's admin token."""
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {server.admin_token}".encode())])


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"x": list(range(offset, offset + n)), "label": [i % 3 for i in range(n)]})


def test_put_stores_tag_md5_parquet_and_lists_row_count(server: DataServer, client: DataClient) -> None:
    table = _table(5)

    name = client.put("mnist", table)

    assert name == f"mnist.{table_digest(table)}.parquet"
    assert (server.data_dir / name).is_file()
    [info] = client.list(["mnist"])
    assert (info.name, info.tag, info.rows) == (name, "mnist", 5)


def test_fetch_returns_what_was_put(client: DataClient) -> None:
    table = _table(7)
    client.put("mnist", table)

    assert client.fetch(["mnist"]).equals(table)


def test_putting_the_same_data_twice_keeps_one_file(server: DataServer, client: DataClient) -> None:
    first = client.put("mnist", _table(4))
    second = client.put("mnist", _table(4))

    assert first == second
    assert client.fetch(["mnist"]).num_rows == 4


def test_list_filters_by_tag_and_empty_criteria_lists_all(client: DataClient) -> None:
    client.put("a", _table(3))
    client.put("b", _table(2, offset=100))
    client.put("c", _table(1, offset=200))

    assert {i.tag for i in client.list(["a", "b"])} == {"a", "b"}
    assert {i.tag for i in client.list(["c"])} == {"c"}
    assert {i.tag for i in client.list()} == {"a", "b", "c"}
    assert client.list(["absent"]) == []


def test_fetch_concatenates_matching_tags_and_unifies_schemas(client: DataClient) -> None:
    client.put("a", pa.table({"x": [1, 2]}))
    client.put("a", pa.table({"x": [3], "extra": ["e"]}))
    client.put("b", pa.table({"x": [99]}))

    table = client.fetch(["a"])

    assert sorted(table.column("x").to_pylist()) == [1, 2, 3]
    assert table.column("extra").null_count == 2
    assert "e" in table.column("extra").to_pylist()


def test_fetch_without_matching_data_names_the_tags(client: DataClient) -> None:
    with pytest.raises(DatasetNotFound, match="absent"):
        client.fetch(["absent"])


def test_drop_removes_only_the_named_tags(client: DataClient) -> None:
    client.put("a", _table(3))
    client.put("a", _table(2, offset=10))
    client.put("b", _table(1))

    dropped = client.drop(["a"])

    assert len(dropped) == 2
    assert all(name.startswith("a.") for name in dropped)
    assert {i.tag for i in client.list()} == {"b"}
    assert client.drop(["a"]) == []


def test_on_change_receives_inventory_after_put_and_drop(client: DataClient, changes: list[dict[str, int]]) -> None:
    client.put("a", _table(3))
    client.put("b", _table(2))
    client.put("b", _table(2))  # same data: nothing changed, no notification
    client.drop(["a"])

    assert changes == [{"a": 3}, {"a": 3, "b": 2}, {"b": 2}]


def test_inventory_reads_rows_per_tag_and_ignores_foreign_files(server: DataServer, client: DataClient) -> None:
    client.put("a", _table(3))
    client.put("a", _table(4, offset=10))
    client.put("b", _table(2))
    (server.data_dir / "notes.txt").write_text("not data")
    (server.data_dir / ".put-abc.tmp").write_bytes(b"half written")

    assert inventory(server.data_dir) == {"a": 7, "b": 2}
    assert {i.tag for i in client.list()} == {"a", "b"}


def test_put_leaves_no_temp_files(server: DataServer, client: DataClient) -> None:
    client.put("a", _table(3))

    assert all(parse_dataset_file_name(p.name) for p in server.data_dir.iterdir())


@pytest.mark.parametrize(
    "ticket",
    [b"../secret.0123456789abcdef0123456789abcdef.parquet", b"/etc/passwd", b"..", b"sub/a.parquet"],
)
def test_get_rejects_names_outside_the_data_directory(server: DataServer, ticket: bytes) -> None:
    secret = server.data_dir.parent / "secret.0123456789abcdef0123456789abcdef.parquet"
    pq.write_table(_table(1), secret)
    raw = flight.FlightClient(server.location)

    with pytest.raises(flight.FlightServerError, match="not a dataset file name"):
        raw.do_get(flight.Ticket(ticket), _admin(server)).read_all()


def test_put_rejects_tags_that_could_escape_the_directory(server: DataServer) -> None:
    raw = flight.FlightClient(server.location)
    table = _table(1)
    writer, _ = raw.do_put(flight.FlightDescriptor.for_path("../evil"), table.schema, _admin(server))

    with pytest.raises(flight.FlightServerError, match="invalid data tag"):
        writer.write_table(table)
        writer.close()
    assert list(server.data_dir.parent.glob("*evil*")) == []


def test_client_rejects_invalid_tags_before_calling(client: DataClient) -> None:
    with pytest.raises(DataRequestRejected, match="invalid data tags"):
        client.put("a/b", _table(1))


def test_get_of_a_missing_dataset_is_not_found(server: DataServer) -> None:
    raw = flight.FlightClient(server.location)

    with pytest.raises(flight.FlightServerError, match="no dataset"):
        raw.do_get(flight.Ticket(b"a.0123456789abcdef0123456789abcdef.parquet"), _admin(server)).read_all()


def test_stopped_server_is_reported_unavailable(tmp_path: Path) -> None:
    data_server = DataServer(tmp_path, port=0)
    data_server.start()
    location = data_server.location
    data_server.stop()

    data_client = DataClient(location, token=data_server.admin_token, timeout=2)
    with data_client, pytest.raises(DataServerUnavailable):
        data_client.list()


def test_original_flops_clients_work_with_a_token(server: DataServer) -> None:
    """The original mock provider puts `<tag>.<md5>.parquet` names; learners list with JSON criteria. Both
    work unchanged once they send a bearer token."""
    raw = flight.FlightClient(server.location)
    options = _admin(server)
    table = _table(6)
    writer, _ = raw.do_put(
        flight.FlightDescriptor.for_path("mnist.ffffffffffffffffffffffffffffffff.parquet"), table.schema, options
    )
    writer.write_table(table)
    writer.close()

    flights = list(raw.list_flights(json.dumps({"data_tags": ["mnist"]}).encode("utf-8"), options))
    [info] = flights
    assert info.total_records == 6
    assert raw.do_get(info.endpoints[0].ticket, options).read_all().equals(table)

    name = info.endpoints[0].ticket.ticket.decode()
    list(raw.do_action(flight.Action("drop_dataset", name.encode()), options))
    assert list(raw.list_flights(b"", options)) == []


def test_drop_accepts_a_bare_tag_body(server: DataServer, client: DataClient) -> None:
    client.put("a", _table(2))
    raw = flight.FlightClient(server.location)

    [result] = list(raw.do_action(flight.Action("drop_dataset", b"a"), _admin(server)))

    assert len(json.loads(result.body.to_pybytes())["dropped"]) == 1
    assert client.list() == []


def test_restart_cleans_temp_files_and_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with DataServer(data_dir) as first, DataClient(first.location, token=first.admin_token) as data_client:
        data_client.put("a", _table(3))
    (data_dir / ".put-crashed.tmp").write_bytes(b"half written")

    with DataServer(data_dir) as second, DataClient(second.location, token=second.admin_token) as data_client:
        assert [i.rows for i in data_client.list(["a"])] == [3]
    assert not (data_dir / ".put-crashed.tmp").exists()


def test_the_name_does_not_depend_on_how_the_upload_was_chunked(server: DataServer) -> None:
    """Rows hashed in fixed slices: the same data sent in other batches lands on the same file (no duplicates)."""
    n = 3000  # more than one digest slice
    table = pa.table({"x": list(range(n)), "s": [str(i) * (i % 4) if i % 7 else None for i in range(n)]})
    raw = flight.FlightClient(server.location)
    names = set()
    for chunk in (1000, 333, 3000):
        writer, reader = raw.do_put(flight.FlightDescriptor.for_path("a"), table.schema, _admin(server))
        with writer:
            writer.write_table(table, max_chunksize=chunk)
            writer.done_writing()
            names.add(json.loads(reader.read().to_pybytes())["name"])

    assert names == {f"a.{table_digest(table)}.parquet"}
    assert inventory(server.data_dir) == {"a": n}
