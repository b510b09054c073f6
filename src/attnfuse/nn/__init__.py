"""``attnfuse.nn``: attention layers that are drop-ins for ``torch.nn`` (same arguments, same
``state_dict`` keys), never return NaN for a query whose keys are all masked, and can return
every layer's per-head attention weights. Depends on torch only.

* :mod:`.functional` — ``scaled_dot_product_attention`` with torch's mask conventions;
* :mod:`.attention` — ``MultiheadAttention``;
* :mod:`.layers` — ``PositionalEncoding``, ``FeedForward``, ``TransformerEncoderLayer``, ``TransformerEncoder``;
* :mod:`.cross` — ``CrossAttention``, ``BidirectionalCrossAttention``.
"""

from . import functional
from .attention import MultiheadAttention
from .cross import BidirectionalCrossAttention, CrossAttention
from .layers import FeedForward, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "functional",
    "MultiheadAttention",
    "PositionalEncoding",
    "FeedForward",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "CrossAttention",
    "BidirectionalCrossAttention",
]
