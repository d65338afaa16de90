"""FLOps ML repository example: multinomial logistic regression on scikit-learn's 8x8 digits.

Each round a learner runs a few L-BFGS iterations from the received global weights
(``warm_start``), so FedAvg over a few partitions converges within a handful of rounds.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from data_manager import DataManager
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from flops_utils.ml_repo_templates import ModelManagerTemplate

N_CLASSES = 10
N_FEATURES = 64
LOCAL_ITERATIONS = 20


class ModelManager(ModelManagerTemplate):
    def __init__(self) -> None:
        self.model = LogisticRegression(max_iter=LOCAL_ITERATIONS, warm_start=True)
        # Parameters exist before the first fit: the aggregator reads them as initial weights.
        self.model.classes_ = np.arange(N_CLASSES)
        self.model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
        self.model.intercept_ = np.zeros(N_CLASSES)

    def set_model_data(self) -> None:
        (self.x_train, self.x_test), (self.y_train, self.y_test) = DataManager().get_data()

    def get_model(self) -> Any:
        return self.model

    def get_model_parameters(self) -> Any:
        return [self.model.coef_, self.model.intercept_]

    def set_model_parameters(self, parameters: Any) -> None:
        self.model.coef_ = np.asarray(parameters[0])
        self.model.intercept_ = np.asarray(parameters[1])

    def fit_model(self) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few local iterations never "converge"
            self.model.fit(self.x_train, self.y_train)
        return len(self.x_train)

    def evaluate_model(self) -> tuple[Any, Any, int]:
        proba = self.model.predict_proba(self.x_test)
        loss = log_loss(self.y_test, proba, labels=self.model.classes_)
        accuracy = self.model.score(self.x_test, self.y_test)
        return loss, accuracy, len(self.x_test)
