"""The Flower ClientApp a learner's SuperNode runs: the repository's ModelManager behind the Message API.

Node config (``flower-supernode --node-config``) names the repository and the data server:
``repo``, ``data-server``, ``data-tags``. The ModelManager (with its data) is built once per
process and reused for every message that process handles.

- train: set the received arrays, ``fit_model(config)`` -> n (``fit_model()`` for repos whose ``fit_model``
  takes no configuration, the original contract), reply arrays + ``num-examples``. ``config`` is a dict:
  ``server_round``, ``strategy``, ``cycle`` (hierarchical mode) and, with FedProx, ``proximal_mu`` (the repo adds
  ``proximal_mu / 2 * ||w - w_global||^2`` to its local objective, ``w_global`` being the arrays just set).
  A strategy that needs the repo's help (FedProx) on a repo that cannot take it fails the round, naming
  ``ModelManager.fit_model``: it never runs as FedAvg;
- a cluster aggregator's SuperNode (node config ``bridge``, ``bridge-timeout``; clustered hierarchical FL) has
  no repo nor data of its own: it hands the root's train and evaluate messages to its cluster's ServerApp
  (``flops.runtime.bridge``) and replies with the cluster's answer;
- evaluate: set the received arrays, ``evaluate_model()`` -> loss, accuracy, n.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flops.runtime.bridge import EVALUATE, TRAIN, Bridge
from flops.runtime.repo import new_model_manager
from flops_utils.ml_repo_building_blocks import DATA_SERVER_ENV, DATA_TAGS_ENV

app = ClientApp()


@functools.lru_cache(maxsize=4)
def prepared_model_manager(repo: str, data_server: str, data_tags: str) -> Any:
    """Build the repository's ModelManager and load its data, once per (repo, data) in this process."""
    os.environ[DATA_SERVER_ENV] = data_server
    os.environ[DATA_TAGS_ENV] = data_tags
    manager = new_model_manager(Path(repo))
    manager.set_model_data()
    return manager


def _manager(context: Context) -> Any:
    cfg = context.node_config
    return prepared_model_manager(str(cfg["repo"]), str(cfg["data-server"]), str(cfg["data-tags"]))


def _set_arrays(manager: Any, msg: Message) -> None:
    arrays = msg.content.array_records["arrays"]
    manager.set_model_parameters(arrays.to_numpy_ndarrays())


# Train-config keys that ask the repo's local training to change (the strategy's client side).
CLIENT_SIDE_KEYS = ("proximal-mu",)


def fit_takes_config(manager: Any) -> bool:
    """Whether the repo's ``fit_model`` accepts the training configuration (one positional argument)."""
    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in kinds for p in inspect.signature(manager.fit_model).parameters.values())


def fit_config(msg: Message) -> dict[str, Any]:
    """The round's train config as the repo sees it: ``proximal-mu`` becomes ``proximal_mu``."""
    record = msg.content.config_records.get("config")
    return {} if record is None else {str(k).replace("-", "_"): v for k, v in record.items()}


def _ask_cluster(msg: Message, context: Context, kind: str) -> tuple[list[Any], dict[str, Any]]:
    config = msg.content.config_records.get("config")
    cycle = int(config["server-round"]) if config is not None and "server-round" in config else 0
    bridge = Bridge(Path(str(context.node_config["bridge"])))
    arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
    return bridge.ask(kind, cycle, arrays, timeout=float(context.node_config["bridge-timeout"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the received global arrays."""
    if "bridge" in context.node_config:
        arrays, metrics = _ask_cluster(msg, context, TRAIN)
        examples = int(metrics["num-examples"])
        reply = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": examples})}
        return Message(content=RecordDict(reply), reply_to=msg)
    manager = _manager(context)
    _set_arrays(manager, msg)
    config = fit_config(msg)
    if fit_takes_config(manager):
        examples = int(manager.fit_model(config))
    elif needs := [k for k in CLIENT_SIDE_KEYS if k.replace("-", "_") in config]:
        raise TypeError(
            f"strategy {config.get('strategy', '?')} needs client-side support ({', '.join(needs)}), but the repo's "
            "ModelManager.fit_model() takes no configuration: define fit_model(self, config)"
        )
    else:
        examples = int(manager.fit_model())
    content = RecordDict(
        {
            "arrays": ArrayRecord(list(manager.get_model_parameters())),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global arrays on the local test split."""
    if "bridge" in context.node_config:
        _, metrics = _ask_cluster(msg, context, EVALUATE)
        record = MetricRecord({k: metrics[k] for k in ("loss", "accuracy", "num-examples")})
        return Message(content=RecordDict({"metrics": record}), reply_to=msg)
    manager = _manager(context)
    _set_arrays(manager, msg)
    loss, accuracy, examples = manager.evaluate_model()
    metrics = MetricRecord({"loss": float(loss), "accuracy": float(accuracy), "num-examples": int(examples)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
