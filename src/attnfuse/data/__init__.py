"""The data layer: a validated multimodal dataset (:mod:`.dataset`), file readers (:mod:`.io`),
the built-in datasets and :func:`load_data` (:mod:`.builtins`)."""

from .builtins import BUILTINS, load_data, load_mfeat, make_planted
from .dataset import SPLITS, Batch, ModalitySpec, MultimodalDataset, Standardizer, iter_batches
from .io import load_npz, load_pickle, read_file, save_npz

__all__ = [
    "SPLITS",
    "Batch",
    "ModalitySpec",
    "MultimodalDataset",
    "Standardizer",
    "iter_batches",
    "load_npz",
    "save_npz",
    "load_pickle",
    "read_file",
    "BUILTINS",
    "load_data",
    "load_mfeat",
    "make_planted",
]
