"""attnfuse: attention-based multimodal fusion for PyTorch.

Layers (``attnfuse.functional``, ``attention``, ``layers``, ``cross``): a drop-in for ``torch.nn``
attention (same arguments, same ``state_dict`` keys) that never returns NaN for fully-masked rows
and can show every layer's attention weights.

Fusion (``data``, ``datasets``, ``fusion``, ``training``, ``checkpoint``): multimodal datasets,
five fusion models, training with early stopping, and model directories.

Explanation (``explain``, ``report``): attention maps, modality attribution, walkthroughs.
"""

from ._version import __version__
from .attention import MultiheadAttention
from .checkpoint import load_model, save_model
from .cross import BidirectionalCrossAttention, CrossAttention
from .data import Batch, ModalitySpec, MultimodalDataset, Standardizer, iter_batches
from .datasets import BUILTINS, load_mfeat, make_planted
from .explain import collect_maps, modality_attention, walkthrough
from .files import load_data, load_npz, save_npz
from .functional import scaled_dot_product_attention
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
from .layers import FeedForward, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer
from .metrics import compute_metrics
from .modules import AttentionMap
from .training import RunResult, TrainConfig, evaluate, fit, model_config, predict, run

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
    # data
    "ModalitySpec",
    "Batch",
    "MultimodalDataset",
    "Standardizer",
    "iter_batches",
    "load_data",
    "load_npz",
    "save_npz",
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
    # training, metrics, checkpoints
    "TrainConfig",
    "RunResult",
    "run",
    "fit",
    "predict",
    "evaluate",
    "model_config",
    "compute_metrics",
    "save_model",
    "load_model",
    # explanation
    "walkthrough",
    "collect_maps",
    "modality_attention",
]
