"""Mock data provider: load a bundled or local dataset, split it IID and push one partition per data server.

Bundled data is scikit-learn's `digits` (shipped inside the wheel, so nothing is ever downloaded). Every
dataset is split deterministically into `train` and a held-out `test` part (`TEST_FRACTION`, stratified by
`label` when present); mock pushes use `train`, so the demo can score the trained model on rows no learner
ever saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.flight as flight
import pyarrow.parquet as pq
import structlog

from flops.data.client import DEFAULT_TIMEOUT_S, DataClient

Split = Literal["train", "test", "all"]
TEST_FRACTION = 0.2
# Fixed forever: changing it would move rows between train and test across runs and leak the held-out set.
_HOLDOUT_SEED = 20_240_917
# npz/npy array names that mean "features" / "targets", mapped onto the MNIST-style `image` / `label`.
_COLUMN_ALIASES = {
    "x": "image",
    "images": "image",
    "data": "image",
    "features": "image",
    "y": "label",
    "labels": "label",
    "target": "label",
    "targets": "label",
}


def _ndarray_column(array: np.ndarray) -> pa.Array:
    """One row per leading index; extra dimensions become nested lists (8x8 image → list of 8 lists of 8)."""
    if array.ndim == 1:
        return pa.array(array)
    values: pa.Array = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        count = len(values) // size if size else 0
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * size)
        values = pa.ListArray.from_arrays(offsets, values)
    return values


def _load_digits() -> pa.Table:
    from sklearn.datasets import load_digits  # only the demo needs scikit-learn; keep agents free of it

    digits = load_digits()
    # 8x8 images, like MNIST's 28x28: `set_format("numpy"); ds["image"].reshape((len(ds), -1))` works.
    return pa.table({"image": _ndarray_column(digits.images), "label": pa.array(digits.target.astype(np.int64))})


BUNDLED: dict[str, Callable[[], pa.Table]] = {"digits": _load_digits}


def _load_npz(path: Path) -> pa.Table:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    return _arrays_table(arrays, path)


def _load_npy(path: Path) -> pa.Table:
    array = np.load(path, allow_pickle=False)
    if array.dtype.names:  # a structured array already names its columns
        return _arrays_table({name: array[name] for name in array.dtype.names}, path)
    return _arrays_table({"data": array}, path)


def _arrays_table(arrays: dict[str, np.ndarray], path: Path) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for name, array in arrays.items():
        column = _COLUMN_ALIASES.get(name.lower(), name)
        if column in columns:
            raise ValueError(f"{path}: arrays map to the same column {column!r}")
        if array.ndim == 0:
            raise ValueError(f"{path}: array {name!r} is a scalar, expected one row per sample")
        columns[column] = _ndarray_column(array)
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: arrays have different numbers of rows: {lengths}")
    return pa.table(columns)


_FILE_LOADERS: dict[str, Callable[[Path], pa.Table]] = {
    ".parquet": pq.read_table,
    ".csv": lambda path: pa_csv.read_csv(str(path)),
    ".npz": _load_npz,
    ".npy": _load_npy,
}


def _held_out_mask(table: pa.Table, fraction: float) -> np.ndarray:
    """Deterministic test-row mask: the same rows for the same table on every run and every machine."""
    rng = np.random.default_rng(_HOLDOUT_SEED)
    mask = np.zeros(table.num_rows, dtype=bool)
    if "label" in table.column_names:
        # Stratify so every class is represented in the held-out accuracy.
        codes = table.column("label").combine_chunks().dictionary_encode().indices
        codes = codes.fill_null(-1).to_numpy(zero_copy_only=False)
        groups = [np.flatnonzero(codes == code) for code in np.unique(codes)]
    else:
        groups = [np.arange(table.num_rows)]
    for rows in groups:
        take = round(len(rows) * fraction)
        mask[rng.permutation(rows)[:take]] = True
    return mask


def load_dataset(name_or_path: str | Path, split: Split = "train") -> pa.Table:
    """A bundled dataset by name (`digits`) or a local .parquet/.csv/.npz/.npy file, as an Arrow table.

    `split` selects the deterministic `train` part, the held-out `test` part (never in `train`), or `all`.
    npz/npy arrays named x/images/data/features become column `image`, y/labels/target(s) become `label`.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    key = str(name_or_path)
    if key in BUNDLED:
        table = BUNDLED[key]()
    else:
        path = Path(name_or_path)
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise ValueError(
                f"unknown dataset {key!r}: bundled datasets are {sorted(BUNDLED)}, "
                f"local files must end in one of {sorted(_FILE_LOADERS)}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        table = loader(path)
    if split == "all":
        return table
    mask = _held_out_mask(table, TEST_FRACTION)
    return table.filter(pa.array(mask if split == "test" else ~mask))


def split_iid(table: pa.Table, n: int, seed: int = 0) -> list[pa.Table]:
    """Shuffle rows with `seed` and cut them into `n` disjoint partitions, sizes differing by at most one."""
    if n < 1:
        raise ValueError(f"number of partitions must be at least 1, got {n}")
    if n > table.num_rows:
        raise ValueError(f"cannot split {table.num_rows} rows into {n} non-empty partitions")
    order = np.random.default_rng(seed).permutation(table.num_rows)
    return [table.take(pa.array(part)) for part in np.array_split(order, n)]


def push_partitions(
    partitions: Sequence[pa.Table],
    locations: Sequence[str | flight.Location],
    tag: str,
    *,
    tokens: Sequence[str],
    ca_file: str | PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[str]:
    """Put partition i on the data server at locations[i] under `tag`, authorised by that node's admin token
    tokens[i]; returns the stored file names."""
    if len(partitions) != len(locations):
        raise ValueError(f"{len(partitions)} partitions for {len(locations)} data servers")
    if len(tokens) != len(locations):
        raise ValueError(f"{len(tokens)} data tokens for {len(locations)} data servers")
    log = structlog.get_logger().bind(tag=tag)
    names = []
    for partition, location, token in zip(partitions, locations, tokens, strict=True):
        with DataClient(location, token=token, ca_file=ca_file, timeout=timeout) as client:
            names.append(client.put(tag, partition))
        log.info("mock.pushed", data_server=client.location, file=names[-1], rows=partition.num_rows)
    return names
