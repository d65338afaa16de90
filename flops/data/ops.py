"""Data operations the CLI runs against agents' data servers: push mock partitions, list what nodes hold.

`mock` loads a bundled or local dataset's `train` split, cuts it into IID partitions and puts one on each
data server; `inventory` asks each agent's data server what it holds, one row per (agent, tag). Both return
plain rows (lists of dicts) for the CLI to print as a table or JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import pyarrow as pa
import structlog

from flops.data.client import DEFAULT_TIMEOUT_S, DataClient, DataError
from flops.data.mock import load_dataset, push_partitions, split_iid
from flops.data.server import is_valid_tag


def mock(
    dataset: str,
    partitions: int,
    tag: str,
    locations: list[str],
    seed: int = 0,
    *,
    tokens: Sequence[str],
    ca_file: str | PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Split `dataset`'s train split into `partitions` IID parts and put part i on `locations[i]` under `tag`
    (with `tokens[i]`, that node's admin token).

    Returns one row per target: `{"location", "tag", "rows", "file"}`. Pushing the same data again stores
    nothing new (the server names files by content), so a retried command cannot duplicate rows.
    """
    if not is_valid_tag(tag):
        raise ValueError(f"invalid data tag {tag!r} (allowed: letters, digits, '_' and '-')")
    if partitions != len(locations):
        raise ValueError(f"{partitions} partitions need {partitions} data servers, got {len(locations)}")
    log = structlog.get_logger(__name__).bind(dataset=dataset, tag=tag, partitions=partitions, seed=seed)
    parts = split_iid(load_dataset(dataset, split="train"), partitions, seed=seed)
    files = push_partitions(parts, locations, tag, tokens=tokens, ca_file=ca_file, timeout=timeout)
    rows = [
        {"location": location, "tag": tag, "rows": part.num_rows, "file": file}
        for location, part, file in zip(locations, parts, files, strict=True)
    ]
    log.info("mock.done", rows=sum(r["rows"] for r in rows))
    return rows


def inventory(
    locations: Mapping[str, str],
    tags: Sequence[str] | None = None,
    *,
    tokens: Mapping[str, str],
    ca_file: str | PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """What each agent's data server holds: one row per (agent, tag), sorted by agent then tag.

    `tokens` maps agent ids to tokens allowed to list their data. Rows are `{"agent_id", "tag", "rows",
    "files", "error"}`. An agent holding nothing gets one row with `tag=None`; an unreachable or refusing
    server, or one without a token, gets one row with the `error` message instead of failing the listing.
    """
    log = structlog.get_logger(__name__)
    table: list[dict[str, Any]] = []
    for agent_id in sorted(locations):
        location = locations[agent_id]
        token = tokens.get(agent_id)
        if not token:
            error = "no data token for this agent (--token, or --agent-dir with its directory)"
            table.append({"agent_id": agent_id, "tag": None, "rows": 0, "files": 0, "error": error})
            continue
        try:
            with DataClient(location, token=token, ca_file=ca_file, timeout=timeout) as client:
                infos = client.list(tags)
        except (DataError, pa.ArrowException) as exc:  # ArrowInvalid: the location is not a URI
            log.warning("inventory.unavailable", agent_id=agent_id, location=location, error=str(exc))
            table.append({"agent_id": agent_id, "tag": None, "rows": 0, "files": 0, "error": str(exc)})
            continue
        per_tag: dict[str, dict[str, Any]] = {}
        for info in infos:
            row = per_tag.setdefault(
                info.tag, {"agent_id": agent_id, "tag": info.tag, "rows": 0, "files": 0, "error": None}
            )
            row["rows"] += info.rows
            row["files"] += 1
        if not per_tag:
            table.append({"agent_id": agent_id, "tag": None, "rows": 0, "files": 0, "error": None})
        table.extend(per_tag[tag] for tag in sorted(per_tag))
    return table
