"""Building blocks ML repositories call inside a learner: ``load_dataset()``.

``load_dataset`` reads every partition the node's Arrow Flight data server holds under one of the
project's data tags and returns them merged as one HuggingFace ``datasets.Dataset``. The learner
wrapper tells it where to look through two environment variables:

- ``FLOPS_DATA_SERVER``: the data server location, e.g. ``grpc://127.0.0.1:5005``;
- ``FLOPS_DATA_TAGS``: the project's data tags, comma separated;
- ``FLOPS_DATA_TOKEN``: the project's read token for that server (the agent sets it for its learner);
- ``FLOPS_TLS_CA_FILE`` (optional): the CA of the server's certificate, when it speaks TLS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pyarrow as pa

DATA_SERVER_ENV = "FLOPS_DATA_SERVER"
DATA_TAGS_ENV = "FLOPS_DATA_TAGS"
DATA_TOKEN_ENV = "FLOPS_DATA_TOKEN"
TLS_CA_ENV = "FLOPS_TLS_CA_FILE"


class DataUnavailableError(RuntimeError):
    """The learner's data could not be located or holds no partition for the project's tags."""


def parse_tags(raw: str) -> list[str]:
    """Split a comma-separated tag list, dropping blanks."""
    return [tag.strip() for tag in raw.split(",") if tag.strip()]


def _fetch_table(location: str, tags: list[str], token: str | None, ca_file: str | None) -> pa.Table:
    """Read and concatenate every Flight stream whose tag matches ``tags``.

    Stand-in for ``flops.data.client.DataClient`` where the ``flops`` package is not installed.
    """
    from pyarrow import flight

    root_certs = Path(ca_file).read_bytes() if ca_file else None
    client = flight.FlightClient(location, tls_root_certs=root_certs)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())] if token else [])
    try:
        criteria = json.dumps({"data_tags": tags}).encode()
        tables = [
            client.do_get(endpoint.ticket, options).read_all()
            for info in client.list_flights(criteria, options)
            for endpoint in info.endpoints
        ]
    finally:
        client.close()
    if not tables:
        raise DataUnavailableError(f"data server {location} holds no partition tagged {tags}")
    return pa.concat_tables(tables, promote_options="default")


def fetch_table(location: str, tags: list[str]) -> pa.Table:
    """Return all partitions matching ``tags`` from the data server at ``location`` as one table.

    Authorised by the token in ``FLOPS_DATA_TOKEN`` (a FLOps data server refuses calls without one); a TLS
    server's certificate is checked against ``FLOPS_TLS_CA_FILE`` when set.
    """
    token = os.environ.get(DATA_TOKEN_ENV) or None
    ca_file = os.environ.get(TLS_CA_ENV) or None
    try:
        from flops.data.client import DataClient  # type: ignore[import-not-found]
    except ImportError:
        return _fetch_table(location, tags, token, ca_file)
    with DataClient(location, token=token, ca_file=ca_file) as client:
        table = client.fetch(tags)
    if table.num_rows == 0:
        raise DataUnavailableError(f"data server {location} holds no rows tagged {tags}")
    return table


def load_dataset() -> datasets.Dataset:
    """Return this node's data for the project's tags as one HuggingFace ``Dataset``."""
    location = os.environ.get(DATA_SERVER_ENV, "")
    tags = parse_tags(os.environ.get(DATA_TAGS_ENV, ""))
    if not location or not tags:
        raise DataUnavailableError(f"{DATA_SERVER_ENV} and {DATA_TAGS_ENV} must both be set")
    return datasets.Dataset(datasets.table.InMemoryTable(fetch_table(location, tags)))
