"""Out-of-fold probabilities: what every CV system of a report said about each dev ad from the fold model that held
it out, written by ``report`` (``report/oof/``) and read by the model judge of a second round
(``triplets.judge_probs``).

Files in ``report/oof/``::

    <system key>.parquet   id, label, then one float32 column per class (the dev pool's classes, sorted): the
                           probabilities of every dev ad (train + val) from the CV fold model that did not see it
    oof.json               format tag, classes, rows, the dev ids' hash, and per system its file and CV macro-F1

Why a second round reads them: the model judge's own probabilities come from logistic regression on the frozen
vectors and TF-IDF; a fine-tuned system's out-of-fold probabilities are better, so the judge flags label errors and
false negatives it missed. Only out-of-fold ones are usable (a model's in-sample probabilities agree with the labels
it was fit on and would flag nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobembed.artifacts import hash_obj, read_json, write_json
from jobembed.errors import DataError

OOF_FORMAT = "jobembed-oof/1"
SIDECAR = "oof.json"


@dataclass(frozen=True)
class OutOfFold:
    """One system's out-of-fold probabilities: ``probs[i]`` is ad ``ids[i]``'s row, columns in ``classes`` order."""

    ids: np.ndarray
    classes: np.ndarray
    probs: np.ndarray
    system: str

    def rows_for(self, ids: np.ndarray, *, what: str, source: Path) -> np.ndarray:
        """The probability rows of ``ids``, in their order.

        Raises:
            DataError: an id the file does not hold (it was made for other rows).
        """
        index = pd.Index(self.ids)
        where = index.get_indexer(np.asarray(ids).astype(str))
        if (where < 0).any():
            missing = np.asarray(ids).astype(str)[where < 0]
            raise DataError(
                f"{source} holds out-of-fold probabilities for {len(self.ids)} dev ads, but {len(missing)} of the "
                f"{len(where)} {what} are not among them (first: {str(missing[0])!r})",
                fix="point triplets.judge_probs at report/oof/ of a run with the same prepare settings and data",
            )
        return self.probs[where]


def write_oof(
    folder: Path,
    *,
    ids: np.ndarray,
    labels: np.ndarray,
    probs: dict[str, np.ndarray],
    file_keys: dict[str, str],
    macro_f1: dict[str, float],
) -> None:
    """Write ``folder`` (see the module docstring); ``probs`` maps system key -> ``(n_dev, k)`` over
    ``np.unique(labels)``."""
    classes = np.unique(np.asarray(labels).astype(str))
    folder.mkdir(parents=True, exist_ok=True)
    systems = {}
    for key, matrix in probs.items():
        assert matrix.shape == (len(ids), len(classes)), (key, matrix.shape)
        frame = pd.DataFrame(np.asarray(matrix, dtype=np.float32), columns=classes)
        frame.insert(0, "label", np.asarray(labels).astype(str))
        frame.insert(0, "id", np.asarray(ids).astype(str))
        name = f"{file_keys[key]}.parquet"
        frame.to_parquet(folder / name, index=False)
        systems[key] = {"file": name, "cv_macro_f1": macro_f1.get(key)}
    write_json(
        folder / SIDECAR,
        {
            "format": OOF_FORMAT,
            "classes": classes.tolist(),
            "rows": len(ids),
            "dev_ids_sha1": hash_obj(np.asarray(ids).astype(str).tolist()),
            "systems": systems,
        },
    )


def read_oof(path: Path) -> OutOfFold:
    """One system's file from a report's ``oof/`` folder.

    Raises:
        DataError: the file or its ``oof.json`` is missing, of another format, or its columns are not the
            sidecar's classes.
    """
    path = Path(path)
    sidecar = path.parent / SIDECAR
    if not path.is_file() or not sidecar.is_file():
        found = f"no {SIDECAR} beside it" if path.is_file() else "not found"
        raise DataError(
            f"{path} is not a file of a report's oof/ folder ({found})",
            fix="run `jobembed report` on the first round's run and name one of RUN/report/oof/*.parquet",
        )
    meta: dict[str, Any] = read_json(sidecar)
    if meta.get("format") != OOF_FORMAT:
        raise DataError(
            f"{sidecar} has format {meta.get('format')!r}, expected {OOF_FORMAT!r}",
            fix="re-run `jobembed report` on the first round's run with this version of jobembed",
        )
    system = next((k for k, v in meta["systems"].items() if v["file"] == path.name), None)
    frame = pd.read_parquet(path)
    classes = np.asarray(meta["classes"], dtype=str)
    if system is None or list(frame.columns[2:]) != classes.tolist():
        raise DataError(
            f"{path} is not one of the systems {SIDECAR} lists, or its columns are not its classes",
            fix="name a file of RUN/report/oof/ as the report wrote it",
        )
    return OutOfFold(
        ids=frame["id"].to_numpy(dtype=str),
        classes=classes,
        probs=frame[classes.tolist()].to_numpy(dtype=np.float64),
        system=system,
    )
