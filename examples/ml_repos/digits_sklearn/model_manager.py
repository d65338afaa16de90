"""FLOps ML repository example: multinomial logistic regression on scikit-learn's 8x8 digits.

Each round a learner runs a few L-BFGS iterations from the received global weights
(``warm_start``), so FedAvg over a few partitions converges within a handful of rounds.

``fit_model(config)`` takes the round's training configuration: with FedProx (``config["proximal_mu"]`` > 0)
the local objective gains the proximal term ``mu/2 * ||w - w_global||^2`` and is minimised with the same
L-BFGS budget (scipy), starting from and anchored at the received global weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from data_manager import DataManager
from scipy.optimize import minimize
from scipy.special import softmax
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

    def fit_model(self, config: Mapping[str, Any] | None = None) -> int:
        mu = float((config or {}).get("proximal_mu", 0.0))
        if mu > 0:
            self._fit_proximal(mu)
            return len(self.x_train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few local iterations never "converge"
            self.model.fit(self.x_train, self.y_train)
        return len(self.x_train)

    def _fit_proximal(self, mu: float) -> None:
        """L-BFGS on scikit-learn's multinomial objective (mean log loss + ||W||^2 / (2 C n)) plus the
        proximal term, anchored at the current (global) parameters."""
        x, n = self.x_train, len(self.x_train)
        onehot = np.eye(N_CLASSES)[self.y_train]
        anchor = np.concatenate([self.model.coef_.ravel(), self.model.intercept_])
        l2 = 1.0 / (self.model.C * n)

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w = theta[: N_CLASSES * N_FEATURES].reshape(N_CLASSES, N_FEATURES)
            b = theta[N_CLASSES * N_FEATURES :]
            proba = softmax(x @ w.T + b, axis=1)
            loss = -np.mean(np.sum(onehot * np.log(np.clip(proba, 1e-15, None)), axis=1))
            delta = theta - anchor
            value = loss + 0.5 * l2 * float(np.sum(w * w)) + 0.5 * mu * float(delta @ delta)
            residual = (proba - onehot) / n
            grad_w = residual.T @ x + l2 * w
            grad_b = residual.sum(axis=0)
            return value, np.concatenate([grad_w.ravel(), grad_b]) + mu * delta

        result = minimize(objective, anchor, jac=True, method="L-BFGS-B", options={"maxiter": LOCAL_ITERATIONS})
        self.model.coef_ = result.x[: N_CLASSES * N_FEATURES].reshape(N_CLASSES, N_FEATURES)
        self.model.intercept_ = result.x[N_CLASSES * N_FEATURES :]

    def evaluate_model(self) -> tuple[Any, Any, int]:
        proba = self.model.predict_proba(self.x_test)
        loss = log_loss(self.y_test, proba, labels=self.model.classes_)
        accuracy = self.model.score(self.x_test, self.y_test)
        return loss, accuracy, len(self.x_test)
