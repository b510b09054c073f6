"""Tables in, as they are: ``.csv`` and ``.parquet`` files (read with pyarrow), one row per sample.

Which columns form which modality is given per modality as a column **prefix** (``aud_`` takes
every column whose name starts with ``aud_``), a **glob** (``txt_*``, ``pix[0-9]*``) or a **list**
of column names, on the command line (``--modality NAME=PATTERN``) or in a small YAML/JSON
mapping file::

    modalities: {text: "txt_*", audio: aud_, meta: [age, height]}
    target: label
    split: fold          # optional

Rules (each broken rule is a one-line error naming the column or pattern):

* every column is used at most once: a column matched by two modalities is an error; patterns
  never match the target and split columns;
* a pattern that matches no column is an error;
* the target column must exist (default ``y``); the split column is optional (default ``split``
  when the table has one) and holds ``train`` / ``valid`` / ``test``;
* feature columns must be numeric (integers, floats, bools);
* a missing value (empty, ``NA``, null or NaN) in **any** column of a modality marks that
  modality absent for that row (its mask is False, its features are never NaN); a row with
  every modality absent is an error naming the row (rows are counted from 0, the header
  excluded);
* the target may hold numbers or strings: string (or non-0..C-1 integer) class labels are
  encoded, their original values kept in ``classes``.

Without modalities, every other column must be named ``<modality>_<feature>`` and the modalities
are the prefixes before the first ``_``, in the order they first appear (``txt_0, txt_1, aud_0``
-> ``txt`` and ``aud``); unused columns are an error then, while with modalities given, columns
that no modality, target or split uses are ignored (e.g. an ID column). A table gives vector
modalities (N, D): sequences need the ``.npz`` or directory formats.

A table already in memory (a ``pyarrow.Table``, or a pandas ``DataFrame`` converted to one) is
read by :func:`read_arrow` with the same rules: files and frames share the column selection.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...options import shorten
from ..dataset import MultimodalDataset
from ..validation import FLOAT32_MAX
from ._common import existing_file, read_bounded

__all__ = [
    "TABLE_SUFFIXES",
    "TableColumns",
    "TableMapping",
    "as_arrow",
    "load_mapping",
    "parse_modality_options",
    "read_arrow",
    "read_table",
    "refuse_table_options",
    "table_batches",
    "table_columns",
]

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
DEFAULT_TARGET, DEFAULT_SPLIT = "y", "split"
GLOB_CHARS = "*?["
MAPPING_BYTES = 1 << 20  # a mapping file names columns: a megabyte is far more than one ever holds


@dataclass(frozen=True)
class TableMapping:
    """Which columns are what: modality name -> prefix, glob or list of columns; target; split."""

    modalities: dict[str, str | list[str]] | None = None
    target: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class TableColumns:
    """The resolved columns of a table: modality -> its feature columns (in order), target, split."""

    modalities: dict[str, list[str]]
    target: str | None  # None: a table without targets (to predict on)
    split: str | None
    where: str = field(default="table", compare=False)

    @property
    def needed(self) -> list[str]:
        cols = [c for cols in self.modalities.values() for c in cols]
        return cols + [c for c in (self.target, self.split) if c]


TABLE_OPTIONS = ("modalities", "target", "split_col", "mapping", "model_columns")


def refuse_table_options(source: object, **options: object) -> None:
    """Table options (modalities, target, split_col, mapping) given for a source that is no table."""
    unknown = sorted(set(options) - set(TABLE_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise ValueError(f"{given[0]}: only for tables ({', '.join(TABLE_SUFFIXES)}), got {str(source)!r}")


def parse_modality_options(options: Sequence[str]) -> dict[str, str]:
    """``["text=txt_*", "audio=aud_"]`` (the CLI's repeated ``--modality``) -> {name: pattern}."""
    out: dict[str, str] = {}
    for option in options:
        name, sep, pattern = str(option).partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not name or not pattern:
            raise ValueError(f"modality: expected NAME=COLUMN_PREFIX_OR_GLOB (e.g. text=txt_*), got {shorten(option)}")
        if name in out:
            raise ValueError(f"modality: {shorten(name)} is given twice ({shorten(out[name])} and {shorten(pattern)})")
        out[name] = pattern
    return out


def load_mapping(path: str | os.PathLike) -> TableMapping:
    """Read a YAML or JSON mapping file: ``{modalities: {name: pattern or [columns]}, target: col,
    split: col}`` (every key optional)."""
    p = existing_file(path, "mapping")
    try:
        text = read_bounded(p, MAPPING_BYTES, "mapping").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"mapping: {p} is not UTF-8 text") from None
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml  # only for mapping files

            raw = yaml.safe_load(text)
    except Exception as e:  # json / yaml syntax errors: one line naming the file
        raise ValueError(f"{p}: not a readable mapping file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return mapping_from_dict(raw, str(p))


def mapping_from_dict(raw: Any, where: str = "mapping") -> TableMapping:
    """Check a mapping's structure (types and keys) and return it as a TableMapping."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys modalities, target, split; got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - {"modalities", "target", "split"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {shorten(unknown)} (expected modalities, target, split)")
    modalities = raw.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, Mapping) or not modalities:
            raise ValueError(f"{where}: 'modalities' must map names to a column prefix, glob or list of columns")
        for name, cols in modalities.items():
            is_pattern = isinstance(cols, str) and bool(cols)
            is_list = isinstance(cols, list) and bool(cols) and all(isinstance(c, str) for c in cols)
            if not isinstance(name, str) or not (is_pattern or is_list):
                raise ValueError(
                    f"{where}: modality {shorten(name)}: expected a column prefix, glob or list of column names, got "
                    f"{shorten(cols)}"
                )
        modalities = dict(modalities)
    for key in ("target", "split"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"{where}: {key!r} must be a column name, got {shorten(raw[key])}")
    return TableMapping(modalities, raw.get("target"), raw.get("split"))


def _match(pattern: str | list[str], columns: list[str], name: str, where: str) -> list[str]:
    """The columns of one modality: a list as given, or every column matching a glob or prefix."""
    if isinstance(pattern, list):
        missing = [c for c in pattern if c not in columns]
        if missing:
            raise ValueError(f"{where}: modality {shorten(name)}: no column named {shorten(missing[0])}")
        return list(pattern)
    if any(ch in pattern for ch in GLOB_CHARS):
        found = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
    else:
        found = [c for c in columns if c.startswith(pattern)]
    if not found:
        raise ValueError(
            f"{where}: modality {shorten(name)}: the pattern {shorten(pattern)} matches no column ({_listing(columns)})"
        )
    return found


def _default_modalities(columns: list[str], where: str, target: str | None) -> dict[str, list[str]]:
    """One modality per column prefix before the first '_' (``txt_0`` -> ``txt``)."""
    bare = [c for c in columns if "_" not in c.strip("_")]
    if bare:
        hint = "" if target else f"if {bare[0]!r} is the target, name it with --target {bare[0]}; "
        raise ValueError(
            f"{where}: no modalities given and column(s) {bare[:5]} are not named <modality>_<feature>; {hint}"
            "name the modalities with --modality NAME=COLUMN_PREFIX_OR_GLOB (or a mapping file)"
        )
    groups: dict[str, list[str]] = {}
    for c in columns:
        groups.setdefault(c.split("_", 1)[0], []).append(c)
    return groups


def resolve_columns(
    columns: list[str], mapping: TableMapping, where: str = "table", model_columns: Mapping | None = None
) -> TableColumns:
    """Apply the rules of the module to a table's column names. ``model_columns``: the columns a
    trained model recorded (``MultimodalDataset.columns``), see :func:`_model_modalities`."""
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise ValueError(f"{where}: the column name {twice[0]!r} appears more than once")
    target = mapping.target or DEFAULT_TARGET
    if mapping.target is None and model_columns is not None and model_columns.get("target"):
        target = model_columns["target"]  # the model's target column, used when the table has it
    if target not in columns and mapping.target is not None:
        raise ValueError(f"{where}: no target column {target!r} ({_listing(columns, target)})")
    if target not in columns:
        target = None  # no target column and none asked for: a table to predict on
    split = mapping.split
    if split is None and model_columns is not None and model_columns.get("split") in columns:
        split = model_columns["split"]
    if split is not None and split not in columns:
        raise ValueError(f"{where}: no split column {split!r}")
    if split is None and DEFAULT_SPLIT in columns and target != DEFAULT_SPLIT:
        split = DEFAULT_SPLIT
    if split is not None and split == target:
        raise ValueError(f"{where}: the column {target!r} cannot be both the target and the split")
    roles = {**({target: "the target"} if target else {}), **({split: "the split column"} if split else {})}
    free = [c for c in columns if c not in roles]
    if mapping.modalities is None and model_columns is not None:
        groups = {name: list(cols) for name, cols in model_columns["modalities"].items()}
        _check_present(groups, columns, where)
    elif mapping.modalities is None:
        groups = _default_modalities(free, where, target)
    else:
        groups = {
            name: _match(p, free if not isinstance(p, list) else columns, name, where)
            for name, p in mapping.modalities.items()
        }
        if model_columns is not None:
            groups = _model_order(groups, mapping.modalities, model_columns["modalities"], where)
    owner: dict[str, str] = {}
    for name, cols in groups.items():
        for c in cols:
            if c in roles:
                raise ValueError(f"{where}: column {c!r} is {roles[c]}; it cannot also be a feature of {name!r}")
            if c in owner:
                raise ValueError(f"{where}: column {c!r} is matched by two modalities, {owner[c]!r} and {name!r}")
            owner[c] = name
    return TableColumns(groups, target, split, where)


def _listing(columns: list[str], near: str | None = None) -> str:
    """The table's columns for a message: the first 12, and those that resemble ``near``."""
    shown = columns[:12]
    if near is not None:
        import difflib

        shown += [c for c in difflib.get_close_matches(near, columns, n=3) if c not in shown]
    more = f", ... ({len(columns)} in all)" if len(columns) > len(shown) else ""
    return "columns: " + ", ".join(shown) + more


def _check_present(groups: dict[str, list[str]], columns: list[str], where: str) -> None:
    """Every column a trained model reads must be in the table: one error naming the missing ones."""
    have = set(columns)
    for name, cols in groups.items():
        missing = [c for c in cols if c not in have]
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(
                f"{where}: the model reads modality {name!r} from columns the table lacks: {shown} "
                "(the table's columns are selected by the names the model was trained with)"
            )


def _model_order(
    groups: dict[str, list[str]], patterns: Mapping, trained: Mapping[str, list[str]], where: str
) -> dict[str, list[str]]:
    """Columns matched by patterns given for a trained model, put in the model's order.

    A glob or prefix expands in the table's column order, which need not be the model's: when it
    matches the model's columns for that modality, they are taken in the model's order. A list of
    columns is the user's own order (e.g. renamed columns) and is used as given."""
    out = {}
    for name, cols in groups.items():
        model = trained.get(name)
        if model is None or isinstance(patterns[name], list) or cols == model:
            out[name] = cols
        elif set(cols) == set(model):
            out[name] = list(model)
        else:
            diff = sorted(set(cols) ^ set(model))
            raise ValueError(
                f"{where}: modality {name!r}: the pattern {patterns[name]!r} matches other columns than the model "
                f"was trained on (differing: {', '.join(diff[:8])}); give the columns as a list, in the model's "
                "order, to read renamed columns"
            )
    return out


def _pyarrow() -> Any:
    """pyarrow and its readers, imported when a table is read (they take a while to import)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    return pa, pc, pcsv, pq


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: expected a table ending in {', '.join(TABLE_SUFFIXES)}")
    return "csv" if suffix == ".csv" else "parquet"


def table_columns(
    path: str | os.PathLike, mapping: TableMapping, model_columns: Mapping | None = None
) -> tuple[TableColumns, int | None]:
    """Resolve the columns of the table at ``path`` from its header / schema only; also its number
    of rows when the file says it without being read (Parquet), else None."""
    p = existing_file(path)
    pa, _, pcsv, pq = _pyarrow()
    try:
        if _kind(p) == "csv":
            with pcsv.open_csv(p) as reader:
                names, rows = reader.schema.names, None
        else:
            meta = pq.ParquetFile(p).metadata
            names, rows = meta.schema.to_arrow_schema().names, meta.num_rows
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{p}: not a readable {_kind(p)} table ({str(e).splitlines()[0]})") from None
    return resolve_columns(list(names), mapping, str(p), model_columns), rows


def table_batches(path: str | os.PathLike, columns: TableColumns, rows_per_batch: int | None = None) -> Iterator[Any]:
    """The needed columns of a table as pyarrow tables: the whole table at once by default; with
    ``rows_per_batch``, Parquet is streamed in batches (CSV is read whole: convert big CSV files to
    Parquet first)."""
    p = Path(path)
    pa, _, pcsv, pq = _pyarrow()
    try:
        if _kind(p) == "csv":
            convert = pcsv.ConvertOptions(include_columns=columns.needed, strings_can_be_null=True)
            yield pcsv.read_csv(p, convert_options=convert)
        elif rows_per_batch is None:
            yield pq.read_table(p, columns=columns.needed)
        else:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=rows_per_batch, columns=columns.needed):
                yield pa.Table.from_batches([batch])
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{p}: not a readable {_kind(p)} table ({str(e).splitlines()[0]})") from None


@dataclass
class TableArrays:
    """One block of rows as arrays: features (k, D) float32 with absent rows 0, presence (k,) bool."""

    features: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    y: np.ndarray | None  # None: no target column
    split: np.ndarray | None


def table_arrays(table: Any, columns: TableColumns, first_row: int = 0) -> TableArrays:
    """Convert a block of rows (a pyarrow table) following ``columns``; ``first_row`` is the block's
    first row in the whole table, for messages."""
    pa, pc, _, _ = _pyarrow()
    where, k = columns.where, table.num_rows
    features, present = {}, {}
    for name, cols in columns.modalities.items():
        x = np.empty((k, len(cols)), dtype=np.float32)
        missing = np.zeros(k, dtype=bool)
        for j, c in enumerate(cols):
            col = table.column(c)
            t = col.type
            if not (
                pa.types.is_integer(t)
                or pa.types.is_floating(t)
                or pa.types.is_boolean(t)
                or pa.types.is_null(t)
                or pa.types.is_decimal(t)
            ):
                raise ValueError(f"{where}: column {c!r} of modality {name!r} is not numeric (type {t})")
            values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
            nan = np.isnan(values)
            big = ~nan & (np.abs(values) > FLOAT32_MAX)
            if big.any():
                row = first_row + int(np.flatnonzero(big)[0])
                raise ValueError(
                    f"{where}: column {c!r}, row {row}: {values[row - first_row]:g} is out of float32 range"
                )
            missing |= nan
            x[:, j] = values
        x[missing] = 0.0  # an absent modality's features are never NaN
        features[name], present[name] = x, ~missing
    none = ~np.logical_or.reduce(list(present.values()))
    if none.any():
        raise ValueError(
            f"{where}: row {first_row + int(np.flatnonzero(none)[0])} has a missing value in every modality "
            f"({int(none.sum())} rows like it in rows {first_row}..{first_row + k - 1}); drop them or fill one modality in"
        )
    y = None
    if columns.target is not None:
        target = table.column(columns.target)
        nulls = pc.is_null(target, nan_is_null=True).to_numpy(zero_copy_only=False)
        if nulls.any():
            raise ValueError(
                f"{where}: the target column {columns.target!r} is missing at row "
                f"{first_row + int(np.flatnonzero(nulls)[0])} ({int(nulls.sum())} rows)"
            )
        y = _column_values(target, pa, f"{where}: the target column {columns.target!r}")
    split = None
    if columns.split is not None:
        s = table.column(columns.split)
        if pc.is_null(s).to_numpy(zero_copy_only=False).any():
            raise ValueError(f"{where}: the split column {columns.split!r} has missing values")
        split = s.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    return TableArrays(features, present, y, split)


def _column_values(col: Any, pa: Any, where: str) -> np.ndarray:
    """A target column as int64, float64 or str numpy values."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return col.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return col.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    raise ValueError(f"{where}: expected numbers or strings, got type {t}")


def read_table(
    path: str | os.PathLike,
    modalities: Mapping[str, str | list[str]] | None = None,
    target: str | None = None,
    split_col: str | None = None,
    *,
    mapping: str | os.PathLike | Mapping | None = None,
    task: str = "auto",
    num_classes: int | None = None,
    classes: list | None = None,
    model_columns: Mapping | None = None,
) -> MultimodalDataset:
    """Read a ``.csv`` / ``.parquet`` table into a dataset (see the module for the rules).

    modalities: name -> column prefix, glob or list of columns (default: one modality per
        ``<modality>_`` column prefix). target: the target column (default ``y``). split_col:
        a column of train/valid/test (default ``split`` when present). mapping: a YAML/JSON
        mapping file (or its dict) giving any of these; arguments given here override it.
    task, num_classes, classes: as for :class:`MultimodalDataset`.
    model_columns: the columns a trained model was read from (its ``MultimodalDataset.columns``,
        kept in config.json): each modality's features are then selected by these names, in this
        order, whatever the table's column order; extra columns are ignored, missing ones are an
        error naming them, and the target column is used when the table has it.
    """
    p = existing_file(path)
    columns, _ = table_columns(p, merge_mapping(mapping, modalities, target, split_col), model_columns)
    (table,) = table_batches(p, columns)
    arrays = table_arrays(table, columns)
    del table  # the arrow columns are no longer needed: only the float32 features stay
    return _dataset(arrays, columns, p.stem, task, num_classes, classes)


def read_arrow(
    table: Any,
    modalities: Mapping[str, str | list[str]] | None = None,
    target: str | None = None,
    split_col: str | None = None,
    *,
    mapping: str | os.PathLike | Mapping | None = None,
    task: str = "auto",
    num_classes: int | None = None,
    classes: list | None = None,
    model_columns: Mapping | None = None,
    name: str = "table",
) -> MultimodalDataset:
    """Read a table already in memory, a ``pyarrow.Table`` (or ``RecordBatch``) or a pandas
    ``DataFrame``, into a dataset: the same rules and arguments as :func:`read_table` (columns by
    name, missing values as absent modalities, string labels), and the same column selection.

    A DataFrame is converted by :func:`as_arrow`. ``name`` names the data (as a file's stem does
    for :func:`read_table`) and the messages about it."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a string, got {type(name).__name__}")
    table = as_arrow(table, name)
    if table.num_rows == 0:
        raise ValueError(f"{name}: the table has no rows")
    names = [str(c) for c in table.column_names]
    columns = resolve_columns(names, merge_mapping(mapping, modalities, target, split_col), name, model_columns)
    return _dataset(table_arrays(table, columns), columns, name, task, num_classes, classes)


def as_arrow(table: Any, where: str = "table") -> Any:
    """A ``pyarrow.Table`` of a Table, a ``RecordBatch`` or a pandas ``DataFrame`` (converted with
    ``pyarrow.Table.from_pandas``, its index left out; pandas itself is never imported here: a
    frame only exists when the caller imported pandas). Anything else is a TypeError."""
    pa, _, _, _ = _pyarrow()
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(table, pandas.DataFrame):
        try:
            return pa.Table.from_pandas(table, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise ValueError(f"{where}: the DataFrame cannot be read as a table ({str(e).splitlines()[0]})") from None
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise TypeError(f"table: expected a pyarrow Table or a pandas DataFrame, got {type(table).__name__}")
    return table


def _dataset(
    arrays: TableArrays, columns: TableColumns, name: str, task: str, num_classes: int | None, classes: list | None
) -> MultimodalDataset:
    """The dataset of a table's rows converted by :func:`table_arrays` following ``columns``."""
    return MultimodalDataset(
        arrays.features,
        arrays.y,
        masks=arrays.present,
        split=arrays.split,
        task=task,
        name=name,
        num_classes=num_classes,
        classes=classes,
        columns={"modalities": columns.modalities, "target": columns.target, "split": columns.split},
    )


def merge_mapping(
    mapping: str | os.PathLike | Mapping | TableMapping | None,
    modalities: Mapping[str, str | list[str]] | None = None,
    target: str | None = None,
    split_col: str | None = None,
) -> TableMapping:
    """A mapping file (or dict) with the arguments given overriding its entries."""
    if mapping is None:
        base = TableMapping()
    elif isinstance(mapping, TableMapping):
        base = mapping
    elif isinstance(mapping, Mapping):
        base = mapping_from_dict(mapping)
    else:
        base = load_mapping(mapping)
    if modalities is not None:
        base = TableMapping(
            mapping_from_dict({"modalities": dict(modalities)}, "modalities").modalities, base.target, base.split
        )
    return TableMapping(base.modalities, target or base.target, split_col or base.split)
