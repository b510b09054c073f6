# ruff: noqa: E402 (the Ctrl-C guard comes before the imports)
"""attnfuse: attention-based multimodal fusion for PyTorch.

Layers (``attnfuse.nn``): a drop-in for ``torch.nn`` attention (same arguments, same ``state_dict``
keys) that never returns NaN for fully-masked rows and can show every layer's attention weights.

Fusion (``data``, ``fusion``, ``training``, ``pipeline``, ``checkpoint``): multimodal datasets
(arrays, tables, memory-mapped directories), five fusion models, training with early stopping,
``--fusion auto``, ensembles, baselines on the same rows, tuning, and model directories.

Explanation (``explain``): attention maps, masking importance, Integrated Gradients, attention
rollout, their agreement, an HTML report, and walkthroughs of the attention arithmetic.
"""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # being run as `python -m attnfuse`: the Ctrl-C guard before torch loads
    from attnfuse_cli import guard_if_run_as_module as _guard

    _guard()
    del _guard
del _sys

from ._version import __version__
from .baselines import fit_baselines
from .checkpoint import load_model, save_model
from .data import (
    BUILTINS,
    Batch,
    ModalitySpec,
    MultimodalDataset,
    RowBatches,
    Split,
    Standardizer,
    convert,
    iter_batches,
    kfold,
    load_data,
    load_directory,
    load_mfeat,
    load_npz,
    make_planted,
    make_split,
    read_table,
    save_directory,
    save_npz,
)
from .ensemble import Ensemble
from .explain import (
    attention_rollout,
    collect_maps,
    explain_model,
    integrated_gradients,
    masking_importance,
    modality_attention,
    walkthrough,
)
from .export import PlainTensorModel, export_model
from .fusion import (
    FUSIONS,
    BiCrossFusion,
    BiCrossFusionConfig,
    ConcatConfig,
    ConcatFusion,
    CrossFusionConfig,
    CrossModalFusion,
    FusionConfig,
    FusionModel,
    MulTConfig,
    MulTFusion,
    SelfAttentionFusion,
    SelfFusionConfig,
    build_model,
)
from .metrics import compute_metrics
from .modules import AttentionMap
from .nn import (
    BidirectionalCrossAttention,
    CrossAttention,
    Dropout,
    FeedForward,
    KeyPaddingMask,
    MultiheadAttention,
    PositionalEncoding,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .nn.functional import scaled_dot_product_attention
from .options import option
from .pipeline import RunOptions, TrainResult, TrainSpec, load_trained, train
from .portfolio import PORTFOLIO, Candidate
from .predictor import FusionPredictor
from .training import Parts, TrainConfig, TrainedModel, Trainer, evaluate, fit_model, model_config, predict

__all__ = [
    "__version__",
    # attention core
    "scaled_dot_product_attention",
    "MultiheadAttention",
    "PositionalEncoding",
    "FeedForward",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "CrossAttention",
    "BidirectionalCrossAttention",
    "KeyPaddingMask",
    "Dropout",
    # data
    "ModalitySpec",
    "Batch",
    "MultimodalDataset",
    "Standardizer",
    "iter_batches",
    "RowBatches",
    "load_data",
    "load_npz",
    "save_npz",
    "read_table",
    "load_directory",
    "save_directory",
    "convert",
    "Split",
    "make_split",
    "kfold",
    "BUILTINS",
    "load_mfeat",
    "make_planted",
    # fusion models
    "FusionConfig",
    "ConcatConfig",
    "SelfFusionConfig",
    "CrossFusionConfig",
    "BiCrossFusionConfig",
    "MulTConfig",
    "FusionModel",
    "ConcatFusion",
    "SelfAttentionFusion",
    "CrossModalFusion",
    "BiCrossFusion",
    "MulTFusion",
    "FUSIONS",
    "build_model",
    "AttentionMap",
    "Ensemble",
    # training, metrics, checkpoints
    "TrainConfig",
    "TrainedModel",
    "Parts",
    "fit_model",
    "Trainer",
    "predict",
    "evaluate",
    "model_config",
    "compute_metrics",
    "save_model",
    "load_model",
    # the commands as functions
    "RunOptions",
    "TrainSpec",
    "TrainResult",
    "train",
    "load_trained",
    "FusionPredictor",
    "option",
    "PORTFOLIO",
    "Candidate",
    "fit_baselines",
    "export_model",
    "PlainTensorModel",
    # explanation
    "walkthrough",
    "collect_maps",
    "modality_attention",
    "masking_importance",
    "integrated_gradients",
    "attention_rollout",
    "explain_model",
]
