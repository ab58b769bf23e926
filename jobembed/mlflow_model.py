"""A jobembed bundle as an MLflow model, "from code": MLflow stores this file and the bundle, never a pickle.

``tracking`` logs every bundle it sees with it (``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"bundle": ...})``), so a bundle is found again by its run id and loaded anywhere MLflow and jobembed are
installed::

    model = mlflow.pyfunc.load_model("runs:/<run id>/bundle")
    model.predict(["Kierowca kat. C+E, transport międzynarodowy"])      # or a DataFrame with a "text" column

``predict`` returns one row per text: ``label``, ``name``, ``confidence``, ``uncertain`` (the bundle's classify
defaults decide abstention).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd


class BundleModel(mlflow.pyfunc.PythonModel):
    """``predict(texts)`` with the bundle that was logged beside this file."""

    def load_context(self, context: Any) -> None:
        from jobembed.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would turn them into a schema
        if isinstance(model_input, pd.DataFrame):
            column = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = model_input[column].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        config = self.bundle.classify_config()
        rows = [
            {"label": p.label, "name": p.name, "confidence": p.confidence, "uncertain": p.uncertain}
            for p in self.bundle.predict(texts, config=config)
        ]
        return pd.DataFrame(rows)


mlflow.models.set_model(BundleModel())
