"""Training on data given in memory (``pipeline.train(..., data=)``) and loading its model with
data in memory (``load_trained(..., data=)``): the hooks a Python API builds on."""

import numpy as np
import pytest

from attnfuse.data import MultimodalDataset
from attnfuse.pipeline import TrainSpec, load_trained, train
from attnfuse.training import predict


def _data(n: int = 120) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, 4)).astype("float32")
    b = rng.normal(size=(n, 3)).astype("float32")
    return MultimodalDataset({"a": a, "b": b}, (a[:, 0] + b[:, 1]).astype("float32"), name="frame")


def test_train_on_data_in_memory_and_load_it_back(tmp_path):
    data = _data()
    spec = TrainSpec.from_options({"data": "frame", "epochs": 2, "fusion": "self", "baselines": False})
    result = train(spec, tmp_path / "m", data=data)
    net, config, standardizer, same = load_trained(tmp_path / "m", data=data)
    assert same is data and config["data"]["source"] == "frame"
    batch = standardizer.transform(data).to_batch()
    again = predict(net, batch).numpy()
    first = predict(result.first.model, batch).numpy()
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-6)


def test_data_in_memory_is_checked(tmp_path):
    spec = TrainSpec.from_options({"data": "frame", "epochs": 1, "fusion": "self", "baselines": False})
    with pytest.raises(TypeError, match="data: expected a MultimodalDataset"):
        train(spec, data={"a": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="resume: a run on data given in memory"):
        train(spec, tmp_path / "m", data=_data(), resume=True)
    with pytest.raises(ValueError, match="source: give data in memory or a source"):
        load_trained(tmp_path / "m", "mfeat", data=_data())
