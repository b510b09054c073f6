"""attnfuse: attention-based multimodal fusion for PyTorch.

The attention core is a drop-in for ``torch.nn`` (same arguments, same ``state_dict`` keys) that
never returns NaN for fully-masked rows and can show every layer's attention weights.
"""

from .attention import MultiheadAttention
from .cross import BidirectionalCrossAttention, CrossAttention
from .functional import scaled_dot_product_attention
from .layers import FeedForward, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention",
    "MultiheadAttention",
    "PositionalEncoding",
    "FeedForward",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "CrossAttention",
    "BidirectionalCrossAttention",
]
