"""FLOps ML repository example: the node's digits partition, split 80/20 into train and test.

Rows have ``image`` (64 pixel intensities 0..16) and ``label`` (0..9); pixels are scaled to 0..1.
"""

from __future__ import annotations

from typing import Any

from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate


class DataManager(DataManagerTemplate):
    def __init__(self) -> None:
        (self.x_train, self.x_test), (self.y_train, self.y_test) = self._prepare_data()

    def _prepare_data(self) -> Any:
        dataset = load_dataset()
        dataset.set_format("numpy")
        x = dataset["image"].reshape((len(dataset), -1)).astype("float64") / 16.0
        y = dataset["label"].astype("int64")
        split = int(0.8 * len(x))
        return (x[:split], x[split:]), (y[:split], y[split:])

    def get_data(self) -> tuple[Any, Any]:
        return (self.x_train, self.x_test), (self.y_train, self.y_test)
