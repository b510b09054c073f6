"""One model trained as a run of ``attnfuse train`` trains it, for the tests of the training code:
the run's split (:class:`attnfuse.splitplan.SplitPlan`), its standardised parts, one
:func:`attnfuse.training.fit_model`."""

from __future__ import annotations

from attnfuse.data import MultimodalDataset
from attnfuse.splitplan import SplitPlan
from attnfuse.training import Parts, TrainConfig, TrainedModel, fit_model


def train_one(
    data: MultimodalDataset,
    fusion: str,
    overrides: dict | None = None,
    train: TrainConfig | None = None,
    *,
    split_seed: int | None = None,
    **kwargs,
) -> TrainedModel:
    """``fusion`` fitted on ``data`` split by ``split_seed`` (default: the training seed)."""
    train = train or TrainConfig()
    split = SplitPlan(train.seed if split_seed is None else split_seed).rows(data)
    return fit_model(Parts.of(data, split), fusion, overrides, train, **kwargs)
