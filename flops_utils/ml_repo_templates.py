"""Abstract base classes every FLOps ML repository implements.

Compatible with the original FLOps ``flops_utils.ml_repo_templates``: a repository's
``data_manager.py`` subclasses :class:`DataManagerTemplate` and its ``model_manager.py``
subclasses :class:`ModelManagerTemplate`. The learner calls ``set_model_data`` once, then
``set_model_parameters`` / ``fit_model`` / ``evaluate_model`` per round; the aggregator only
builds the model (no data) to read its initial parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class DataManagerTemplate(ABC):
    """Loads the node-local data (via ``load_dataset()``) and prepares it for the model."""

    @abstractmethod
    def _prepare_data(self) -> Any:
        """Load the data with ``flops_utils.ml_repo_building_blocks.load_dataset`` and preprocess it."""

    @abstractmethod
    def get_data(self) -> tuple[Any, Any]:
        """Return the prepared data, e.g. ``(x_train, x_test), (y_train, y_test)``; called by the ModelManager."""


class ModelManagerTemplate(ABC):
    """Owns the model: its parameters, local training and local evaluation."""

    @abstractmethod
    def set_model_data(self) -> None:
        """Fetch the data from the DataManager; called by the learner only, never in ``__init__``."""

    @abstractmethod
    def get_model(self) -> Any:
        """Return the managed model object."""

    @abstractmethod
    def get_model_parameters(self) -> Any:
        """Return the model parameters as a list of numpy arrays."""

    @abstractmethod
    def set_model_parameters(self, parameters: Any) -> None:
        """Replace the model parameters with ``parameters`` (a list of numpy arrays)."""

    @abstractmethod
    def fit_model(self) -> int:
        """Train locally and return the number of training examples used."""

    @abstractmethod
    def evaluate_model(self) -> tuple[Any, Any, int]:
        """Evaluate locally and return ``(loss, accuracy, number_of_evaluation_examples)``."""
