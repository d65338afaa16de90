"""Tests for the mock data provider: bundled digits, local files, held-out split, IID split and pushing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from flops.data.client import DataClient
from flops.data.mock import TEST_FRACTION, load_dataset, push_partitions, split_iid
from flops.data.server import DataServer, inventory

DIGITS_ROWS = 1797  # scikit-learn's bundled digits


def _rows(table: pa.Table) -> Counter[str]:
    """Rows as a multiset, to compare tables regardless of order."""
    return Counter(repr(row) for row in table.to_pylist())


def _ids_table(n: int) -> pa.Table:
    return pa.table({"id": list(range(n)), "value": [i * 0.5 for i in range(n)], "label": [i % 4 for i in range(n)]})


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[DataServer]]:
    started = [DataServer(tmp_path / f"node{i}", port=0) for i in range(3)]
    for data_server in started:
        data_server.start()
    yield started
    for data_server in started:
        data_server.stop()


def test_digits_has_mnist_style_image_and_label_columns() -> None:
    table = load_dataset("digits", split="all")

    assert table.num_rows == DIGITS_ROWS
    assert table.column_names == ["image", "label"]
    first = table.column("image")[0].as_py()
    assert len(first) == 8 and all(len(row) == 8 for row in first)
    assert set(table.column("label").to_pylist()) == set(range(10))


def test_digits_works_with_an_mnist_style_data_manager() -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset(load_dataset("digits"))
    dataset.set_format("numpy")

    x = dataset["image"].reshape((len(dataset), -1))

    assert x.shape == (len(dataset), 64)
    assert dataset["label"].shape == (len(dataset),)


def test_digits_held_out_split_is_disjoint_deterministic_and_covers_every_class() -> None:
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")

    assert train.num_rows + test.num_rows == DIGITS_ROWS
    assert test.num_rows == pytest.approx(DIGITS_ROWS * TEST_FRACTION, abs=10)
    assert _rows(train) + _rows(test) == _rows(load_dataset("digits", split="all"))
    assert load_dataset("digits", split="test").equals(test)
    assert set(test.column("label").to_pylist()) == set(range(10))


def test_held_out_split_of_a_file_never_overlaps_train(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(_ids_table(100), path)

    train_ids = set(load_dataset(path, split="train").column("id").to_pylist())
    test_ids = set(load_dataset(path, split="test").column("id").to_pylist())

    assert train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == set(range(100))
    assert len(test_ids) == 20


def test_loads_parquet_and_csv_files(tmp_path: Path) -> None:
    table = _ids_table(10)
    pq.write_table(table, tmp_path / "d.parquet")
    pa_csv.write_csv(table, tmp_path / "d.csv")

    assert load_dataset(tmp_path / "d.parquet", split="all").equals(table)
    assert load_dataset(str(tmp_path / "d.csv"), split="all").to_pylist() == table.to_pylist()


def test_loads_npz_mapping_x_y_to_image_and_label(tmp_path: Path) -> None:
    x = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    y = np.arange(5)
    np.savez(tmp_path / "d.npz", x=x, y=y)

    table = load_dataset(tmp_path / "d.npz", split="all")

    assert table.column_names == ["image", "label"]
    assert table.column("image")[4].as_py() == x[4].tolist()
    assert table.column("label").to_pylist() == y.tolist()


def test_loads_npy_as_image_column(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.ones((4, 3)))

    table = load_dataset(tmp_path / "d.npy", split="all")

    assert table.column_names == ["image"]
    assert table.column("image").to_pylist() == [[1.0, 1.0, 1.0]] * 4


def test_npz_with_mismatched_lengths_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)), y=np.zeros(4))

    with pytest.raises(ValueError, match="different numbers of rows"):
        load_dataset(tmp_path / "bad.npz")


def test_unknown_dataset_names_the_options() -> None:
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent.csv")


def test_split_iid_partitions_are_disjoint_balanced_and_complete() -> None:
    table = _ids_table(103)

    parts = split_iid(table, 4, seed=1)

    sizes = [p.num_rows for p in parts]
    assert sum(sizes) == 103
    assert max(sizes) - min(sizes) <= 1
    ids = [i for p in parts for i in p.column("id").to_pylist()]
    assert sorted(ids) == list(range(103))


def test_split_iid_is_seeded() -> None:
    table = _ids_table(50)

    first = [p.column("id").to_pylist() for p in split_iid(table, 3, seed=7)]

    assert first == [p.column("id").to_pylist() for p in split_iid(table, 3, seed=7)]
    assert first != [p.column("id").to_pylist() for p in split_iid(table, 3, seed=8)]


def test_split_iid_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError):
        split_iid(_ids_table(2), 3)
    with pytest.raises(ValueError):
        split_iid(_ids_table(2), 0)


def test_push_partitions_puts_one_partition_on_each_server(servers: list[DataServer]) -> None:
    train = load_dataset("digits")
    parts = split_iid(train, len(servers), seed=0)

    names = push_partitions(parts, [s.location for s in servers], "digits", tokens=[s.admin_token for s in servers])

    assert len(set(names)) == len(servers)
    for data_server, part in zip(servers, parts, strict=True):
        assert inventory(data_server.data_dir) == {"digits": part.num_rows}
    fetched = [DataClient(s.location, token=s.admin_token).fetch(["digits"]) for s in servers]
    assert sum((_rows(t) for t in fetched), Counter()) == _rows(train)


def test_push_partitions_needs_one_server_per_partition(servers: list[DataServer]) -> None:
    with pytest.raises(ValueError, match="2 partitions for 3"):
        push_partitions(split_iid(_ids_table(4), 2), [s.location for s in servers], "t", tokens=["x" * 20] * 3)
