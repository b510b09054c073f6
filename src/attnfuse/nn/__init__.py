"""``attnfuse.nn``: attention layers that are drop-ins for ``torch.nn`` (same arguments, same
``state_dict`` keys), never return NaN for a query whose keys are all masked, keep a NaN in a
hidden key away from every output, and can return every layer's per-head attention weights.
Depends on torch only.

* :mod:`.functional` — ``scaled_dot_product_attention`` with torch's mask conventions;
* :mod:`.masks` — merging masks; ``KeyPaddingMask``, a padding mask prepared once for many layers;
* :mod:`.dropout` — ``Dropout`` / ``dropout``: torch's dropout with a cheaper mask on the CPU;
* :mod:`.explicit` — ``explicit_attention``: attention with dropout on the CPU, with its own backward;
* :mod:`.kernels` — which CPU kernel computes attention with dropout: timed at first use per shape;
* :mod:`.compiling` — ``compile_model``: ``torch.compile`` with a warning where it was measured slower;
* :mod:`.attention` — ``MultiheadAttention``;
* :mod:`.layers` — ``PositionalEncoding``, ``FeedForward``, ``TransformerEncoderLayer``, ``TransformerEncoder``;
* :mod:`.cross` — ``CrossAttention``, ``BidirectionalCrossAttention``.
"""

from . import functional
from .attention import MultiheadAttention
from .cross import BidirectionalCrossAttention, CrossAttention
from .dropout import Dropout
from .layers import FeedForward, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer
from .masks import KeyPaddingMask

__all__ = [
    "functional",
    "MultiheadAttention",
    "PositionalEncoding",
    "FeedForward",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "CrossAttention",
    "BidirectionalCrossAttention",
    "Dropout",
    "KeyPaddingMask",
]
