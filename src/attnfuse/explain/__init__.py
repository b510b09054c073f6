"""Explaining a trained fusion model: where it looked, what it needs, and the arithmetic behind it.

* :mod:`.walkthrough` — softmax(Q Kᵀ / √d_k) V worked by hand for small vectors.
* :mod:`.attention` — a model's attention maps, attention between modalities and steps over a
  split, a bertviz export.
* :mod:`.masking` — modality importance by hiding modalities through their masks (exact for the
  model, every fusion).
* :mod:`.gradients` — Integrated Gradients and gradient × input with Captum, per modality, step
  and feature.
* :mod:`.rollout` — attention rollout across layers (Abnar & Zuidema, 2020).
* :mod:`.agreement` — the methods side by side, rank correlations, sentences where they differ.
* :mod:`.run` — :func:`explain_model`: every chosen method over a split and a few samples.
* :mod:`.report` — figures and the self-contained HTML report (``write_report``; imported on
  first use, as it loads matplotlib).
"""

from ._common import token_modality, token_valid
from .agreement import Agreement, agreement
from .attention import ModalityAttention, bertviz_export, collect_maps, key_valid, modality_attention, require_attention
from .gradients import GradientAttribution, gradient_attribution, gradient_x_input, integrated_gradients
from .masking import MaskingImportance, hide, masking_importance
from .rollout import Rollout, attention_rollout, rollout_stack
from .run import CHEAP_METHODS, METHODS, Explanation, SampleExplanation, explain_model, resolve_methods
from .walkthrough import Walkthrough, parse_vectors, walkthrough

__all__ = [  # alphabetical
    "Agreement",
    "agreement",
    "attention_rollout",
    "bertviz_export",
    "CHEAP_METHODS",
    "collect_maps",
    "explain_model",
    "Explanation",
    "gradient_attribution",
    "gradient_x_input",
    "GradientAttribution",
    "hide",
    "integrated_gradients",
    "key_valid",
    "masking_importance",
    "MaskingImportance",
    "METHODS",
    "modality_attention",
    "ModalityAttention",
    "parse_vectors",
    "require_attention",
    "resolve_methods",
    "Rollout",
    "rollout_stack",
    "SampleExplanation",
    "token_modality",
    "token_valid",
    "Walkthrough",
    "walkthrough",
    "write_report",
]


def __getattr__(name: str):
    # write_report lives in .report, which imports matplotlib: load it only when asked for.
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
