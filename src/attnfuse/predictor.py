""":class:`FusionPredictor`: ``attnfuse train`` / ``predict`` / ``evaluate`` as one Python object with
scikit-learn's conventions, for data that lives in a notebook::

    predictor = FusionPredictor(target="score", epochs=20).fit(df)      # a DataFrame, Table, path or dict
    predictor.predict(new_df)                                              # the user's labels / values
    predictor.save("runs/score")                                           # the CLI's model directory

Why it is thin: everything it does is done by the command line's own functions. ``fit`` builds a
:class:`~attnfuse.pipeline.TrainSpec` from its options (the options of ``attnfuse train``, checked
by :meth:`TrainSpec.from_options`: there is no list of options here) and calls
:func:`attnfuse.pipeline.train` with the data in memory, so ``--fusion auto``, ``--ensemble``,
``--repeat`` and the baselines work as on the command line, and the model directory it writes is
the one ``attnfuse train`` writes. Tables (a pandas DataFrame, a pyarrow Table, a CSV or Parquet
file) are read by :func:`attnfuse.data.io.table.read_arrow` / ``read_table``, which select columns
by name; a trained model reads any table by the column names it recorded, whatever their order,
with or without the target column. A dict of arrays is ``{modality: (N, D) or (N, T, D)}`` with
optional ``mask_<modality>`` ((N,) presence or (N, T) valid steps), the targets under the target
key (default ``y``) and a split under ``split``.

scikit-learn's rules kept: the constructor stores its arguments unchanged (``get_params`` returns
them, ``set_params`` sets them, so ``sklearn.base.clone`` works), fitted state ends in ``_``
(``classes_``, ``model_dir_``, ``config_``), ``fit`` returns the predictor, ``predict_proba``'s
columns are ``classes_``, ``score`` is accuracy (classification) or R² (regression). pandas is
not needed: a DataFrame is converted with pyarrow, and ``leaderboard()`` returns plain rows
(``pandas.DataFrame(rows)`` makes a frame of them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baselines import verdict_line
from .calibration import calibrated_probabilities, half_width_of, prediction_interval
from .checkpoint import (
    CONFIG,
    LOG,
    METRICS,
    RUN,
    WEIGHTS,
    check_compatible,
    load_model,
    metrics_for_json,
    run_directory,
)
from .data import MultimodalDataset, RowBatches, decode_labels, read_arrow
from .data.io._common import read_bounded
from .data.io.table import as_arrow
from .explain import explain_model
from .explain.run import Explanation, column_names
from .export import export_model
from .metrics import compute_metrics
from .options import shorten
from .pipeline import (
    TrainResult,
    TrainSpec,
    data_for_model,
    label_space,
    load,
    metrics_per_part,
    read_options,
    train,
    train_options,
    without_consent,
)
from .threads import set_threads
from .training import TrainConfig, predict, to_predictions

__all__ = ["FusionPredictor"]

MAX_METRICS_BYTES = 64 << 20  # metrics.json: metrics per split, candidate and baseline; far less
# Constructor arguments besides the options of `attnfuse train`, in the order of the signature.
OWN_PARAMS = ("target", "modalities", "path", "progress")
# Names of data given in memory (config.json's data name and source, run.yaml's data).
FRAME, ARRAYS = "frame", "arrays"


class FusionPredictor:
    """A multimodal fusion model with scikit-learn's interface: ``fit``, ``predict``,
    ``predict_proba``, ``score``, ``evaluate``, ``explain``, ``leaderboard``, ``save`` / ``load``, ``export``.

    Args:
        target: the target column of a table or key of a dict (default ``y``).
        modalities: for tables, modality name -> column prefix (``"aud_"``), glob (``"txt_*"``)
            or list of columns (default: one modality per ``<modality>_`` column prefix).
        path: the model directory ``fit`` writes (default: a temporary one, removed with the
            predictor; :meth:`save` copies it where you want it).
        progress: ``callable(event, info)`` called while training (the events of :data:`attnfuse.fit.ProgressCallback`).
        **options: the options of ``attnfuse train`` by their Python names (``fusion="cross"``,
            ``epochs=20``, ``ensemble=5``, ``baselines=False``, ``split_col="fold"``, ...), checked
            by :meth:`attnfuse.pipeline.TrainSpec.from_options`; not ``data`` (given to ``fit``).

    Data (``X``) may be a pandas DataFrame, a pyarrow Table, a path (``.csv``, ``.parquet``,
    ``.npz``, a directory dataset, a built-in's name), a dict of arrays, or a
    :class:`~attnfuse.data.MultimodalDataset`. Fitted attributes: ``model_dir_``, ``config_``
    (its config.json), ``task_``, ``classes_`` (classification: the user's labels, the columns of
    :meth:`predict_proba`), ``report_`` (metrics.json), and after ``fit`` ``verdict_`` (a
    baseline that beats the fusion on the validation split, or None) and ``seconds_``. Predictions
    are computed on the CPU with the model in memory: a model directory replaced after ``fit`` or
    ``load`` does not change them."""

    def __init__(
        self,
        target: str | None = None,
        modalities: Mapping[str, str | list[str]] | None = None,
        *,
        path: str | os.PathLike | None = None,
        progress: Callable[[str, dict], None] | None = None,
        **options: Any,
    ) -> None:
        self.target = target
        self.modalities = modalities
        self.path = path
        self.progress = progress
        self._options = options
        self._spec()  # every argument checked now (and again in fit, after set_params)

    # -- scikit-learn's parameter protocol ----------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, as given (the options of ``attnfuse train`` by name)."""
        return {
            "target": self.target,
            "modalities": self.modalities,
            "path": self.path,
            "progress": self.progress,
            **self._options,
        }

    def set_params(self, **params: Any) -> FusionPredictor:
        """Set constructor arguments (any option of ``attnfuse train``); the new set is checked as
        the constructor checks it, and left unchanged when it is refused."""
        before = (self.target, self.modalities, self.path, self.progress, dict(self._options))
        for name, value in params.items():
            if name in OWN_PARAMS:
                setattr(self, name, value)
            else:
                self._options[name] = value
        try:
            self._spec()
        except (TypeError, ValueError):
            self.target, self.modalities, self.path, self.progress, self._options = before
            raise
        return self

    def __sklearn_tags__(self) -> Any:
        """What scikit-learn's tools (``cross_val_score``, ``is_classifier``) ask of an estimator:
        a classifier or a regressor once the task is known (fitted, or ``task=`` given); tables
        with missing values (an absent modality) and dicts as input; targets inside X or apart."""
        from sklearn.utils import ClassifierTags, InputTags, RegressorTags, Tags, TargetTags

        task = getattr(self, "task_", None) or self._options.get("task")
        kind = {"classification": "classifier", "regression": "regressor"}.get(task)
        return Tags(
            estimator_type=kind,
            target_tags=TargetTags(required=False, multi_output=task != "classification"),
            classifier_tags=ClassifierTags() if kind == "classifier" else None,
            regressor_tags=RegressorTags() if kind == "regressor" else None,
            input_tags=InputTags(two_d_array=True, dict=True, allow_nan=True),
        )

    def __repr__(self) -> str:
        given = {k: v for k, v in self.get_params().items() if v is not None}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in given.items())})"

    def _spec(self) -> TrainSpec:
        """The training request of these arguments (checked); its ``data`` is named in ``fit``."""
        if self.target is not None and not isinstance(self.target, str):
            raise TypeError(f"target: expected a column name (str) or None, got {type(self.target).__name__}")
        if self.modalities is not None and not isinstance(self.modalities, Mapping):
            raise TypeError(
                f"modalities: expected a dict of modality name -> column prefix, glob or list of columns, "
                f"got {type(self.modalities).__name__}"
            )
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str, an os.PathLike or None, got {type(self.path).__name__}")
        if self.progress is not None and not callable(self.progress):
            raise TypeError(f"progress: expected a callable(event, info) or None, got {type(self.progress).__name__}")
        if "data" in self._options:
            raise ValueError(
                f"data: give the data to fit() (fit(df)), not as an option; got {shorten(self._options['data'])}"
            )
        if self.modalities is not None and self._options.get("modality") is not None:
            raise ValueError("modality: give the modalities once, as modalities={name: pattern} or as modality=[...]")
        values = {**self._options, "target": self.target}
        if self.modalities is not None and all(isinstance(v, str) for v in self.modalities.values()):
            # As --modality NAME=PATTERN in run.yaml, so that `attnfuse train --config` reads the
            # table the same way. A list of columns has no such form: config.json keeps the columns.
            values["modality"] = [f"{name}={pattern}" for name, pattern in self.modalities.items()]
        return TrainSpec.from_options(values, where="FusionPredictor")

    def _table(self, spec: TrainSpec) -> dict[str, Any]:
        """How tables are read: the reading options of ``spec`` (None: the defaults), with
        ``modalities`` as given (a list of columns has no ``--modality`` form in ``spec``)."""
        if self.modalities is None:
            return spec.run.table_options()
        return {**replace(spec.run, modality=None).table_options(), "modalities": dict(self.modalities)}

    # -- training -------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None, *, valid: Any = None) -> FusionPredictor:
        """Train on ``X`` as ``attnfuse train`` does (``--fusion auto`` by default, with the
        baselines) and keep the model. ``y``: the targets, when ``X`` does not hold them (a
        DataFrame, Table or dict without the target column). Without a split column the data is
        split 70/15/15 by ``seed``; with one (``split_col=`` for a table, key ``split`` for a dict)
        its ``train``/``valid``/``test`` rows are used.

        ``valid``: validation rows of your own (early stopping, ``--fusion auto``'s choice, the
        baselines' comparison), of the same kind as ``X`` (a DataFrame or Table, or a dict of
        arrays) with the same columns or keys, holding their targets (or ``(V, y_valid)`` when
        ``y`` is given apart). ``X`` is then trained on whole: there are no test rows, and no test
        metrics. Returns the predictor."""
        spec = self._spec()
        if valid is not None:
            X, y = self._with_valid(X, y, valid, spec.run.split_col or "split")
        data, source = self._training_data(X, y, spec)
        scratch, out = self._output()
        try:
            result = self._train(replace(spec, run=replace(spec.run, data=source)), out, data)
            self._attach(out)
        except BaseException:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        if getattr(self, "_cleanup", None) is not None:
            self._cleanup()  # the temporary directory of an earlier fit
        self._cleanup = None if scratch is None else weakref.finalize(self, shutil.rmtree, scratch, ignore_errors=True)
        self.verdict_ = result.verdict
        self.seconds_ = dict(result.seconds)
        if result.verdict is not None and result.verdict["clear"]:  # what the command line says in a line
            warnings.warn(verdict_line(result.verdict, self.config_["fusion"]), UserWarning, stacklevel=2)
        return self

    def _train(self, spec: TrainSpec, out: Path, data: MultimodalDataset) -> TrainResult:
        """:func:`attnfuse.pipeline.train` with the command line's thread count (the free cores,
        or threads=) for this fit only; the count used is part of the run (run.yaml), as on the
        command line."""
        before = torch.get_num_threads()
        try:
            threads = set_threads(spec.train.threads)
            return train(replace(spec, train=replace(spec.train, threads=threads)), out, self.progress, data=data)
        finally:
            torch.set_num_threads(before)

    def _with_valid(self, X: Any, y: Any, valid: Any, name: str) -> tuple[Any, Any]:
        """``X`` and ``valid`` as one table or dict (and one ``y``) whose split column ``name``
        (``split_col`` or ``split``) says ``train`` for the rows of ``X`` and ``valid`` for those of ``valid``:
        what :func:`attnfuse.data.make_split` reads as a split without test rows."""
        v, y_valid = valid if isinstance(valid, tuple) and len(valid) == 2 else (valid, None)
        if (y is None) != (y_valid is None):
            raise ValueError(
                "valid: give the targets the same way for X and valid: inside both, or as fit(X, y, valid=(V, y_valid))"
            )
        if isinstance(X, MultimodalDataset):
            raise ValueError("valid: X is a MultimodalDataset; mark its validation rows 'valid' in its split instead")
        if isinstance(X, (str, os.PathLike)):
            raise ValueError(
                f"valid: X is a path; give its validation rows in its split column instead ('valid' rows in "
                f"{name!r}, see split_col=), or read it into a table first"
            )
        if isinstance(X, Mapping):
            if not isinstance(v, Mapping):
                raise TypeError(f"valid: expected a dict of arrays, as X is, got {type(v).__name__}")
            target = self.target or "y"
            return _stack_arrays(_with_targets(X, y, target), _with_targets(v, y_valid, target), name), None
        train_part, valid_part = _as_table(X), _as_table(v)
        if y is not None:
            target = self.target or "y"
            train_part, valid_part = _append_column(train_part, y, target), _append_column(valid_part, y_valid, target)
        return _stack_tables(train_part, valid_part, name), None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. by joblib) without the removal of the temporary model directory, which
        stays with the original; a copy predicts from the model it holds in memory."""
        state = dict(self.__dict__)
        state.pop("_cleanup", None)
        return state

    def _output(self) -> tuple[str | None, Path]:
        """(a temporary directory to remove later or None, the model directory to write)."""
        if self.path is not None:
            return None, Path(self.path)
        scratch = tempfile.mkdtemp(prefix="attnfuse-predictor-")
        return scratch, Path(scratch) / "model"

    def _training_data(self, X: Any, y: Any, spec: TrainSpec) -> tuple[MultimodalDataset, str]:
        """``X`` (and ``y``) read as a dataset to train on, and the name run.yaml gives it: a
        file's full path (so that ``attnfuse train --config run.yaml`` reads it again), else
        ``frame`` / ``arrays`` / the dataset's name."""
        task, table = spec.run.task, self._table(spec)
        if isinstance(X, MultimodalDataset):
            _no_targets_twice(y, "a MultimodalDataset holds its targets")
            _no_table_options(table, "a MultimodalDataset")
            return X, X.name  # train() reads it as spec.run.task
        if isinstance(X, (str, os.PathLike)):
            _no_targets_twice(y, "a file holds its targets: name the column with target=")
            source = os.fspath(X)
            if Path(source).exists():
                source = str(Path(source).resolve())
            return load(source, spec.run.allow_pickle, spec.train.seed, task, **table), source
        if isinstance(X, Mapping):
            # target and split_col name keys of the dict; column patterns have nothing to select.
            _no_table_options(
                {**table, "target": None, "split_col": None}, "a dict of arrays (its keys are the modalities)"
            )
            return _from_arrays(_with_targets(X, y, self.target or "y"), self.target, table["split_col"], task), ARRAYS
        frame = _as_table(X)
        if y is not None:
            frame = _append_column(frame, y, self.target or "y")
        return read_arrow(frame, task=task, name=FRAME, **table), FRAME

    def _attach(self, model_dir: str | os.PathLike) -> None:
        """Keep the model of ``model_dir`` (in memory), its config and its metrics."""
        net, config, standardizer = load_model(model_dir)
        metrics = Path(model_dir) / METRICS
        report = None
        if metrics.exists():
            try:
                report = json.loads(read_bounded(metrics, MAX_METRICS_BYTES, "metrics").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"model: {metrics} is not valid JSON ({e})") from None
        self.model_dir_ = Path(model_dir)
        self.config_ = config
        self.model_, self.standardizer_ = net, standardizer
        self.report_ = report

    @property
    def task_(self) -> str:
        """``classification`` or ``regression``: the task of the model held (config.json's)."""
        return self.config_["data"]["task"]

    @property
    def classes_(self) -> np.ndarray:
        """The class labels as the user gave them, in the order of :meth:`predict_proba`'s columns
        (classification only: a regression model has no ``classes_``)."""
        data = self.config_["data"]
        if data["task"] != "classification":
            raise AttributeError("classes_: the model predicts regression values; it has no classes")
        return np.asarray(decode_labels(np.arange(data["num_classes"]), data.get("classes")))

    # -- model directories ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory to ``path`` (what ``attnfuse train --out`` writes: weights,
        config.json, metrics.json, run.yaml, log.csv), replacing a previous run there in one step
        (the CLI's transaction: a reader sees the old or the new run, complete). Returns the path."""
        self._check_fitted("save")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        target = Path(path)
        if target.exists() and target.resolve() == self.model_dir_.resolve():
            return target
        with run_directory(target) as tmp:
            for name in (WEIGHTS, CONFIG, METRICS, RUN, LOG):
                if (self.model_dir_ / name).is_file():
                    shutil.copyfile(self.model_dir_ / name, tmp / name)
            _, copied, _ = load_model(tmp)  # a complete, consistent directory: the model this predictor holds
            if copied.get("weights_id") != self.config_.get("weights_id"):
                raise ValueError(
                    f"model: {self.model_dir_} was replaced by another run since this predictor read it; "
                    "nothing was saved"
                )
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, *, allow_pickle: bool = False) -> FusionPredictor:
        """A predictor holding the model of the directory ``path`` (written by ``attnfuse train``,
        ``tune`` or :meth:`save`). Its parameters are the options of the directory's ``run.yaml``
        (so ``clone`` of it trains the same way again); ``allow_pickle`` is never read from a file."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        run = Path(path) / RUN
        recorded = without_consent(read_options(run)) if run.is_file() else {}
        defaults = {o.name: o.default for o in train_options()}
        # The options that differ from their defaults: the same training, and a readable repr. Not
        # the data (fit is given it) nor the device, which may differ from the machine that trained
        # (a model trained with device="cuda" loads where there is none), as with --resume.
        options = {
            k: v for k, v in recorded.items() if k not in ("data", "device") and (k not in defaults or v != defaults[k])
        }
        target = options.pop("target", None)
        if allow_pickle:
            options["allow_pickle"] = True
        predictor = cls(target, **options)
        predictor._attach(path)
        return predictor

    def export(self, path: str | os.PathLike, format: str = "onnx", **kwargs: Any) -> dict:
        """The model as a graph over plain tensors (``format``: onnx, torchscript or exported),
        written to ``path``: :func:`attnfuse.export.export_model` on the model directory."""
        self._check_fitted("export")
        return export_model(self.model_dir_, path, format, **kwargs)

    # -- predictions ----------------------------------------------------------------------------

    def predict(self, X: Any) -> np.ndarray:
        """Predictions for the rows of ``X``: class labels (N,) as the user gave them in training
        (strings stay strings), or regression values (N,) / (N, K). ``X`` needs no target."""
        _, outputs = self._run(X)
        pred = to_predictions(self.task_, outputs)
        if self.task_ == "classification":
            return decode_labels(pred, self.config_["data"].get("classes"))
        return pred

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (N, C), float64 (each row sums to 1); column j is ``classes_[j]``.
        Calibrated when the model was trained with ``calibrate=True`` (the default): ``softmax(logits
        / T)`` with the temperature fitted on the validation rows (``config_["calibration"]``);
        their argmax, :meth:`predict`'s class, is the same either way."""
        if self._check_fitted("predict_proba") != "classification":
            raise ValueError("predict_proba: the model predicts regression values, not classes; use predict")
        _, outputs = self._run(X, what="predict_proba")
        return calibrated_probabilities(outputs, self.config_)

    def predict_interval(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)``: the prediction intervals of a regression trained with
        ``interval=LEVEL``, each shaped as :meth:`predict`'s values ((N,) or (N, K)): the
        prediction minus and plus the split-conformal half-width of its target
        (``config_["calibration"]["half_width"]``), which holds a new row's target with probability
        at least LEVEL when the rows are exchangeable with the validation rows it was fitted on."""
        if self._check_fitted("predict_interval") != "regression":
            raise ValueError("predict_interval: the model predicts classes; predict_proba gives their probabilities")
        if half_width_of(self.config_) is None:
            raise ValueError(
                "predict_interval: the model was trained without intervals; train it with interval=LEVEL (e.g. 0.9)"
            )
        _, outputs = self._run(X, what="predict_interval")
        lower, upper = prediction_interval(outputs, self.config_)  # (N, K) each
        return (lower[:, 0], upper[:, 0]) if lower.shape[1] == 1 else (lower, upper)

    def score(self, X: Any, y: Any = None) -> float:
        """Accuracy (classification) or R² (regression) on ``X``'s targets, or on ``y`` when given
        (labels as in training)."""
        data, outputs = self._run(X, y, "score")
        if data.y is None:
            raise ValueError(f"y: {data.name} has no targets to score against; give y or the target column")
        metric = "accuracy" if self.task_ == "classification" else "r2"
        return float(compute_metrics(self.task_, data.y, to_predictions(self.task_, outputs))[metric])

    def evaluate(self, X: Any, y: Any = None) -> dict[str, dict[str, Any]]:
        """The metrics of ``attnfuse evaluate``: per split of ``X`` (its split column; for the
        training data itself, the split drawn in training) and on all rows (``"all"``), and under
        ``"calibration"`` those of the calibrated outputs per part (``ece`` and ``nll`` of the
        probabilities; ``coverage`` and ``width`` of the intervals); undefined metrics are None."""
        data = self._checked_data(X, y, "evaluate")
        if data.y is None:
            raise ValueError(f"y: {data.name} has no targets to evaluate against; give y or the target column")
        return metrics_for_json(metrics_per_part(self.model_, self.config_, self.standardizer_, data))

    def explain(
        self,
        X: Any,
        y: Any = None,
        *,
        methods: str | Sequence[str] = "auto",
        samples: Sequence[int] | None = None,
        n_steps: int = 50,
        target: int | None = None,
    ) -> Explanation:
        """What the model's predictions on ``X`` rest on: ``attnfuse explain`` in Python
        (:func:`attnfuse.explain.explain_model` on every row of ``X``, read as :meth:`predict`
        reads it; the explanations compare predictions with targets, so ``X`` needs them, or
        ``y``). ``methods``: ``"auto"`` (attention, masking, gradient x input, rollout; those a
        model has), ``"all"`` or a list of ``attention, mask, ig, gxi, rollout``; ``samples``: rows
        of ``X`` explained one by one (default the first two); ``n_steps``: Integrated
        Gradients' steps; ``target``: the class explained (default the predicted one).

        Returns the :class:`~attnfuse.explain.Explanation`: ``agreement.shares`` (method ->
        each modality's share, in ``agreement.modalities``' order), ``agreement.drops`` (the metric
        lost when each is hidden), ``masking``, ``gradients``, ``attention``, ``samples``, ``notes``."""
        data = self._checked_data(X, y, "explain")
        return explain_model(
            self.model_,
            data,
            self.standardizer_,
            methods=methods,
            samples=samples,
            n_steps=n_steps,
            target=target,
            feature_names=column_names(self.config_),
        )

    def leaderboard(self) -> list[dict[str, Any]]:
        """Every model the training compared, best validation score first, as flat rows:
        ``model``, ``kind`` (``ensemble``, ``fusion`` or ``baseline``), ``fusion``, ``picked`` (the
        model kept), and ``<split>_<metric>`` values (with ``--repeat``/``--folds``: means, and
        ``<split>_<metric>_std``). With ``--fusion auto`` the model kept is the weighted ensemble
        (its own row) and every candidate and baseline has its ``weight`` in it; the candidates have
        validation scores only (choosing by a test score would leak the test rows); the model kept
        and the baselines have every split. ``pandas.DataFrame(predictor.leaderboard())`` makes a
        table of it."""
        self._check_fitted("leaderboard")
        if self.report_ is None:
            raise ValueError(f"leaderboard: {self.model_dir_} has no {METRICS} (it was not written by attnfuse train)")
        report, selection = self.report_, self.config_.get("auto") or {}
        kept = report.get("summary", {k: v for k, v in report.items() if k in ("train", "valid", "test")})
        picked = selection.get("picked")
        weights = _weights(report)
        rows = []
        if weights:  # the model kept is the weighted ensemble of the rows below
            primary = self.config_["fusion"]
            rows.append(
                {"model": "weighted ensemble", "kind": "ensemble", "fusion": primary, "picked": True, **_flat(kept)}
            )
            picked = None
        for name, scores in (report.get("candidates") or {}).items():
            fusion = (selection.get("candidates") or {}).get(name, {}).get("fusion", name)
            parts = kept if name == picked else scores
            row = {"model": name, "kind": "fusion", "fusion": fusion, "picked": name == picked, **_flat(parts)}
            rows.append({**row, "weight": weights[name]} if weights else row)
        if not rows:
            fusion = self.config_["fusion"]
            rows.append({"model": fusion, "kind": "fusion", "fusion": fusion, "picked": True, **_flat(kept)})
        for name, parts in (report.get("baselines") or {}).items():
            row = {"model": name, "kind": "baseline", "fusion": None, "picked": False, **_flat(parts)}
            if weights:
                row["weight"] = weights.get(name, 0.0)
            if "skipped" in parts:
                row["skipped"] = parts["skipped"]
            rows.append(row)
        metric, mode = TrainConfig(loss=self.config_["train"].get("loss", "auto")).selection_metric(self.task_)
        sign = -1.0 if mode == "max" else 1.0

        def rank(row: dict) -> tuple[bool, float]:
            value = row.get(f"valid_{metric}")
            return (value is None, 0.0 if value is None else sign * value)

        return sorted(rows, key=rank)

    def _check_fitted(self, what: str) -> str:
        if not hasattr(self, "config_"):
            raise ValueError(
                f"{what}: this FusionPredictor is not fitted yet; call fit(X) or FusionPredictor.load(path)"
            )
        return self.task_

    def _run(self, X: Any, y: Any = None, what: str = "predict") -> tuple[MultimodalDataset, torch.Tensor]:
        """``X`` read for the model (its columns, modalities and label space) and the model's raw
        outputs (N, out_dim) on it."""
        data = self._checked_data(X, y, what)
        return data, predict(self.model_, RowBatches(data, None, self.standardizer_))

    def _checked_data(self, X: Any, y: Any, what: str) -> MultimodalDataset:
        """``X`` (and ``y``) read for the model, once it is fitted."""
        self._check_fitted(what)
        return self._data_for_model(X, y)

    def _data_for_model(self, X: Any, y: Any) -> MultimodalDataset:
        """``X`` read as the model's data: a table by the columns the model recorded, a dict by its
        modality names, labels in its label space; checked against it (shapes, task)."""
        trained, labels = self.config_["data"], label_space(self.config_)
        classification = self.task_ == "classification"
        columns = trained.get("columns")
        target = (columns or {}).get("target") or self.target or "y"
        if isinstance(X, MultimodalDataset):
            _no_targets_twice(y, "a MultimodalDataset holds its targets")
            data = X if X.y is None else X.as_task(self.task_)
            if classification and data.y is not None and data.classes != trained.get("classes"):
                raise ValueError(
                    f"X: the dataset's classes {shorten(data.classes)} are not the model's {shorten(trained.get('classes'))}; "
                    "build it with classes= the model's (predictor.classes_)"
                )
        elif isinstance(X, (str, os.PathLike)):
            _no_targets_twice(y, "a file holds its targets in its target column")
            data = data_for_model(self.config_, os.fspath(X), bool(self._options.get("allow_pickle")))
        elif isinstance(X, Mapping):
            names = [m["name"] for m in trained["modalities"]]
            split = self._options.get("split_col")
            data = _from_arrays(_with_targets(X, y, target), target, split, modalities=names, **labels)
        else:
            frame = _as_table(X)
            if y is not None:
                frame = _append_column(frame, y, target)
            if columns is not None:
                data = read_arrow(frame, model_columns=columns, name=FRAME, **labels)
            else:  # a model trained on arrays: columns named <modality>_<feature>
                data = read_arrow(frame, target=target if target in frame.column_names else None, name=FRAME, **labels)
        check_compatible(self.config_, data)
        return data


# ---------------------------------------------------------------------------------------------
# Reading data given in memory


def _train_valid(n_train: int, n_valid: int) -> np.ndarray:
    """A split column: ``n_train`` rows ``train``, then ``n_valid`` rows ``valid``."""
    return np.array(["train"] * n_train + ["valid"] * n_valid, dtype=object)


def _stack_tables(train: Any, valid: Any, split: str) -> Any:
    """The rows of ``train`` then those of ``valid`` (its columns taken by ``train``'s names and
    types, in ``train``'s order), with the split column ``split`` saying which is which."""
    import pyarrow as pa

    if split in train.column_names:
        raise ValueError(f"valid: X already has a split column {split!r}; give the validation rows once")
    missing = [c for c in train.column_names if c not in valid.column_names]
    if missing:
        raise ValueError(f"valid: no column {missing[0]!r} (X has it; valid needs every column of X)")
    try:
        valid = valid.select(train.column_names).cast(train.schema)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"valid: its columns cannot take X's types ({str(e).splitlines()[0]})") from None
    both = pa.concat_tables([train, valid])
    return both.append_column(split, pa.array(_train_valid(train.num_rows, valid.num_rows), pa.string()))


def _stack_arrays(train: Mapping, valid: Mapping, split: str) -> dict[str, Any]:
    """Every array of ``train`` followed by ``valid``'s under the same key, with ``split``: (N,)
    ``train`` / ``valid``."""
    if split in train:
        raise ValueError(f"valid: X already has a split under {split!r}; give the validation rows once")
    missing = [k for k in train if k not in valid]
    if missing:
        raise ValueError(f"valid: no array {shorten(missing[0])} (X has it; valid needs every key of X)")
    stacked: dict[str, Any] = {}
    for key, first in train.items():
        a, b = np.asarray(first), np.asarray(valid[key])
        if a.ndim == 0 or b.ndim == 0 or a.shape[1:] != b.shape[1:]:
            expected = ", ".join(["M", *map(str, a.shape[1:])])
            raise ValueError(f"valid: {shorten(key)}: expected shape ({expected}) as X's {a.shape}, got {b.shape}")
        stacked[key] = np.concatenate([a, b])
    # Rows counted by the first array; arrays of another length are refused by MultimodalDataset.
    key = next(iter(train), None)
    sizes = (0, 0) if key is None else (len(np.asarray(train[key])), len(np.asarray(valid[key])))
    stacked[split] = _train_valid(*sizes)
    return stacked


def _as_table(X: Any) -> Any:
    """A pyarrow Table of a DataFrame or Table; anything else that is no known data is a TypeError."""
    try:
        return as_arrow(X)
    except TypeError:
        raise TypeError(
            "X: expected a pandas DataFrame, a pyarrow Table, a path, a dict of arrays or a MultimodalDataset, "
            f"got {type(X).__name__}"
        ) from None


def _append_column(table: Any, y: Any, name: str) -> Any:
    """``table`` with the targets ``y`` (N,) as its column ``name``."""
    import pyarrow as pa

    if name in table.column_names:
        raise ValueError(f"y: X already has the target column {name!r}; give the targets once")
    values = np.asarray(y)
    if values.ndim != 1 or values.shape[0] != table.num_rows:
        raise ValueError(f"y: expected shape ({table.num_rows},) (one target per row of X), got {values.shape}")
    return table.append_column(name, pa.array(values))


def _with_targets(arrays: Mapping, y: Any, key: str) -> Mapping:
    """A dict of arrays with the targets ``y`` under ``key`` (``arrays`` itself when y is None)."""
    if y is None:
        return arrays
    if key in arrays:
        raise ValueError(f"y: X already has targets under {key!r}; give them once")
    return {**arrays, key: y}


def _no_targets_twice(y: Any, why: str) -> None:
    if y is not None:
        raise ValueError(f"y: expected None here ({why}), got {type(y).__name__}")


def _no_table_options(table: dict[str, Any], what: str) -> None:
    given = [k for k, v in table.items() if v is not None]
    if given:
        raise ValueError(f"{given[0]}: selects the columns of a table; {what} is not read by column")


def _from_arrays(
    arrays: Mapping,
    target: str | None,
    split: str | None,
    task: str = "auto",
    *,
    modalities: list[str] | None = None,
    classes: list | None = None,
    num_classes: int | None = None,
) -> MultimodalDataset:
    """A dataset from ``{modality: (N, D) or (N, T, D), "mask_<modality>": (N,) or (N, T) bool,
    target: (N,) or (N, K), "split": (N,) str}``. ``modalities``: the ones to take (a trained
    model's, other keys are ignored); by default every key that is not a target, split or mask."""
    if not all(isinstance(k, str) for k in arrays):
        bad = next(k for k in arrays if not isinstance(k, str))
        raise TypeError(f"X: expected a dict with modality names (str) as keys, got the key {shorten(bad)}")
    target, split = target or "y", split or "split"
    masks = {k.removeprefix("mask_"): v for k, v in arrays.items() if k.startswith("mask_") and k[5:] in arrays}
    if modalities is None:
        modalities = [k for k in arrays if k not in (target, split) and not (k.startswith("mask_") and k[5:] in arrays)]
    else:
        missing = [m for m in modalities if m not in arrays]
        if missing:
            raise ValueError(f"X: no array for modality {missing[0]!r} (the model reads {', '.join(modalities)})")
    return MultimodalDataset(
        {m: arrays[m] for m in modalities},
        arrays.get(target),
        masks={m: masks[m] for m in modalities if m in masks},
        split=arrays.get(split),
        task=task,
        name=ARRAYS,
        classes=classes,
        num_classes=num_classes,
    )


def _weights(report: dict) -> dict[str, float]:
    """Each model's weight in the weighted ensemble ``--fusion auto`` saved (its mean over the runs
    of ``--repeat``/``--folds``); empty without one."""
    weighted = report.get("weighted") or {}
    return {n: (w["mean"] if isinstance(w, dict) else w) for n, w in weighted.get("weights", {}).items()}


def _flat(parts: Mapping) -> dict[str, Any]:
    """``{split: {metric: value or {"mean", "std"}}}`` as ``{split_metric: value}`` (and ``_std``)."""
    row: dict[str, Any] = {}
    for split, metrics in parts.items():
        if not isinstance(metrics, Mapping):
            continue
        for metric, value in metrics.items():
            if isinstance(value, Mapping):
                row[f"{split}_{metric}"] = value.get("mean")
                row[f"{split}_{metric}_std"] = value.get("std")
            else:
                row[f"{split}_{metric}"] = value
    return row
