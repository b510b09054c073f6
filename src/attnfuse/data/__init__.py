"""The data layer, in the order a sample flows through it.

* :mod:`.validation` — checks of every part of a dataset, as functions;
* :mod:`.labels` — class labels used as they are or encoded to 0..C-1 (``classes``);
* :mod:`.dataset` — ``MultimodalDataset`` (storage, spec, subsets, batches), ``Batch``,
  ``iter_batches`` and the lazy ``RowBatches``;
* :mod:`.splits` — train/valid/test splits, carved validation parts, K folds;
* :mod:`.preprocessing` — ``Standardizer`` (streaming fit; per dataset, in place or per batch);
* :mod:`.io` — readers and writers per format (.npz, tables, directories, pickles;
  ``read_arrow``: a pyarrow Table or pandas DataFrame in memory, read as a table file is);
* :mod:`.builtins` — the built-in datasets; :mod:`.sources` — :func:`load_data` (a built-in's
  name, a file or a directory); :mod:`.convert` — ``convert`` (any source -> a directory dataset).
"""

from .builtins import BUILTINS, load_mfeat, make_planted
from .convert import convert
from .dataset import SPLITS, Batch, ModalitySpec, MultimodalDataset, iter_batches
from .io import read_file
from .io.directory import load_directory, save_directory
from .io.mult_pickle import load_pickle
from .io.npz import load_npz, save_npz
from .io.table import read_arrow, read_table
from .labels import MAX_CLASSES, decode_labels, encode_labels
from .preprocessing import RowBatches, Standardizer
from .sources import load_data
from .splits import Split, bags, carve_valid, halve_valid, kfold, make_split

__all__ = [
    "SPLITS",
    "Batch",
    "ModalitySpec",
    "MultimodalDataset",
    "RowBatches",
    "Standardizer",
    "iter_batches",
    "Split",
    "make_split",
    "carve_valid",
    "kfold",
    "bags",
    "halve_valid",
    "MAX_CLASSES",
    "encode_labels",
    "decode_labels",
    "load_npz",
    "save_npz",
    "load_pickle",
    "read_table",
    "read_arrow",
    "load_directory",
    "save_directory",
    "read_file",
    "convert",
    "BUILTINS",
    "load_data",
    "load_mfeat",
    "make_planted",
]
