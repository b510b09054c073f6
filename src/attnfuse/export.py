"""A trained model as a graph over plain tensors, for serving outside Python's attnfuse: ONNX (run
with onnxruntime), TorchScript, or a ``torch.export`` program.

Inputs, for every modality ``m`` in the model's order (``config.json``, ``data.modalities``), two
tensors, always both, always present:

* ``x_<m>``: float32 ``(B, T_m, D_m)``, the raw features (a vector modality has ``T_m = 1``);
* ``mask_<m>``: bool ``(B, T_m)``, True = a valid step. An absent modality is an all-False row.

The batch size B is dynamic. The feature standardisation fitted in training is inside the graph,
and features at invalid steps are zeroed there (their values, even NaN, never reach the model).
Output ``probabilities`` ``(B, C)`` for classification (softmax of the logits, classes in the
order of ``config.json``'s ``data.classes`` or 0..C-1), ``values`` ``(B, K)`` for regression.
A calibrated classifier's temperature is inside the graph (``softmax(logits / T)``: the
probabilities of ``attnfuse predict``). A regression's prediction intervals are not outputs: their
half-widths are constants, one per target, given in the description :func:`export_model` returns
(``interval``), and ``values -/+ half_width`` are the bounds.

Why a wrapper and not the model itself: the fusion models take a ``Batch`` (a dataclass of
dicts), which no exporter accepts, and they take shortcuts after reading the masks' values
("nothing is padded": no mask at all). A graph recorded from rows without padding would keep that
shortcut and ignore every later mask. While a graph is recorded the attention layers take the
masked path always (:func:`attnfuse.nn.masks.tracing`), and :func:`export_model` checks the
exported graph against the eager model on rows with padding, absent modalities and samples whose
sequences are entirely absent before it writes anything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .calibration import half_width_of, temperature_of
from .checkpoint import load_model
from .checks import check_positive_float
from .data.dataset import Batch
from .data.preprocessing import Standardizer
from .ensemble import Ensemble, first_member
from .files import write_bytes
from .fusion import FusionModel
from .options import option

__all__ = [
    "FORMATS",
    "ExportOptions",
    "PlainTensorModel",
    "export_model",
    "example_inputs",
    "input_names",
    "run_exported",
]

FORMATS = ("onnx", "torchscript", "exported")
PARITY_TOLERANCE = 1e-5  # exported vs eager, max abs difference of the outputs (float32)


@dataclass
class ExportOptions:
    """The options of ``attnfuse export`` (and the keyword arguments of :func:`export_model`)."""

    format: str = option(
        "onnx",
        "onnx: an ONNX graph for onnxruntime; torchscript: torch.jit; exported: a torch.export program.",
        choices=FORMATS,
    )
    check: bool = option(
        True, "Run the exported graph on rows with padding and absent modalities and compare it with the model first."
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {self.format!r}")


class PlainTensorModel(nn.Module):
    """A trained model behind plain tensors: ``forward(x_1, mask_1, x_2, mask_2, ...)``.

    Args:
        model: a trained :class:`~attnfuse.fusion.FusionModel` or :class:`~attnfuse.ensemble.Ensemble`.
        standardizer: its training statistics (per modality ``(D,)`` mean and std).
        task: ``"classification"`` (output: probabilities ``(B, C)``) or ``"regression"`` (values ``(B, K)``).
        temperature: classification: the probabilities are ``softmax(logits / temperature)`` (a
            model directory's: :func:`attnfuse.calibration.temperature_of` of its config; 1.0: the
            plain softmax).

    Inputs per modality, in ``model``'s order: ``x`` float32 ``(B, T, D)``, ``mask`` bool ``(B, T)``."""

    def __init__(
        self, model: FusionModel | Ensemble, standardizer: Standardizer, task: str, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
        self.temperature = check_positive_float("temperature", temperature)  # a constant of the graph
        self.model = model.eval()
        self.task = task
        self.specs = list(first_member(model).config.modalities)
        for spec in self.specs:
            mean = torch.as_tensor(np.asarray(standardizer.mean[spec.name]), dtype=torch.float32)
            std = torch.as_tensor(np.asarray(standardizer.std[spec.name]), dtype=torch.float32)
            self.register_buffer(f"mean_{spec.name}", mean)  # (D,)
            self.register_buffer(f"std_{spec.name}", std)  # (D,)

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != 2 * len(self.specs):
            raise ValueError(f"inputs: expected {2 * len(self.specs)} tensors ({input_names(self)}), got {len(inputs)}")
        x, mask = {}, {}
        for i, spec in enumerate(self.specs):
            features, valid = inputs[2 * i], inputs[2 * i + 1]  # (B, T, D), (B, T)
            scaled = (features - getattr(self, f"mean_{spec.name}")) / getattr(self, f"std_{spec.name}")
            x[spec.name] = torch.where(valid.unsqueeze(-1), scaled, torch.zeros_like(scaled))  # (B, T, D)
            mask[spec.name] = valid
        out = self.model(Batch(x, mask, None))  # (B, out_dim)
        if self.task != "classification":
            return out
        return torch.softmax(out if self.temperature == 1.0 else out / self.temperature, dim=-1)


def input_names(model: PlainTensorModel) -> list[str]:
    """``["x_<m1>", "mask_<m1>", "x_<m2>", ...]``: the graph's inputs, in order."""
    return [name for spec in model.specs for name in (f"x_{spec.name}", f"mask_{spec.name}")]


def example_inputs(model: PlainTensorModel, batch_size: int = 4, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs that exercise every masked case: padded steps in every sequence, a sample with a
    modality absent, and (with several modalities) each modality absent in some sample; NaN at
    invalid steps (they must never matter)."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    n = len(model.specs)
    for i, spec in enumerate(model.specs):
        x = torch.randn(batch_size, spec.length, spec.dim, generator=g)  # (B, T, D)
        valid = torch.ones(batch_size, spec.length, dtype=torch.bool)  # (B, T)
        if spec.length > 1:
            lengths = torch.randint(1, spec.length + 1, (batch_size,), generator=g)
            valid = torch.arange(spec.length).unsqueeze(0) < lengths.unsqueeze(1)
        if n > 1:
            valid[(i + 1) % batch_size] = False  # modality i absent in one sample (another stays)
        x = torch.where(valid.unsqueeze(-1), x, torch.full_like(x, float("nan")))
        inputs += [x, valid]
    return tuple(inputs)


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    format: str = "onnx",
    *,
    check: bool = True,
    opset: int = 18,
) -> dict:
    """Write the model of ``model_dir`` to ``out`` in ``format`` (one of :data:`FORMATS`) and
    return its description (inputs, output, classes, the temperature inside the graph, a
    regression's interval half-widths, the parity measured). With ``check``, the
    exported graph is run on :func:`example_inputs` (padding, absent modalities) and on a batch of
    another size, and must agree with the eager model to :data:`PARITY_TOLERANCE`; a graph that
    does not is a ValueError and nothing is written."""
    ExportOptions(format, check)  # the same checks as the command line's
    net, config, standardizer = load_model(model_dir)
    wrapper = PlainTensorModel(net, standardizer, config["data"]["task"], temperature_of(config)).eval()
    names = input_names(wrapper)
    output = "probabilities" if wrapper.task == "classification" else "values"
    example = example_inputs(wrapper, batch_size=4)
    with torch.no_grad():
        if format == "onnx":
            data = _to_onnx(wrapper, example, names, output, opset)
        else:
            buffer = io.BytesIO()
            if format == "torchscript":
                torch.jit.save(torch.jit.trace(wrapper, example, check_trace=False), buffer)
            else:
                torch.export.save(_exported(wrapper, example), buffer)
            data = buffer.getvalue()
    parity = _parity(wrapper, data, format, names) if check else None
    write_bytes(out, data)  # only a graph that passed its check, written atomically
    return {
        "format": format,
        "inputs": [
            {
                "name": f"{kind}_{s.name}",
                "shape": ["batch", s.length] + ([s.dim] if kind == "x" else []),
                "dtype": "float32" if kind == "x" else "bool",
            }
            for s in wrapper.specs
            for kind in ("x", "mask")
        ],
        "output": output,
        "output_dim": first_member(net).config.out_dim,
        "classes": config["data"].get("classes"),
        "temperature": wrapper.temperature if wrapper.task == "classification" else None,
        "interval": _interval(config),
        "max_abs_difference": parity,
    }


def _interval(config: dict) -> dict | None:
    """A regression's prediction intervals as the description gives them: ``{"level",
    "half_width"}`` (``values -/+ half_width`` per target), or None."""
    half = half_width_of(config)
    return None if half is None else {"level": config["calibration"]["level"], "half_width": half.tolist()}


def _dynamic_batch(wrapper: PlainTensorModel) -> tuple[dict, ...]:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return (tuple({0: batch} for _ in range(2 * len(wrapper.specs))),)  # forward(*inputs): one entry


def _exported(wrapper: PlainTensorModel, example: Sequence[Tensor]):
    return torch.export.export(wrapper, tuple(example), dynamic_shapes=_dynamic_batch(wrapper), strict=False)


def _to_onnx(wrapper: PlainTensorModel, example, names: list[str], output: str, opset: int) -> bytes:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ValueError(
            "format onnx: needs the onnx and onnxscript packages (pip install 'attnfuse[export]')"
        ) from None
    with _exporter_quiet():
        program = torch.onnx.export(
            wrapper,
            tuple(example),
            dynamo=True,
            input_names=names,
            output_names=[output],
            dynamic_shapes=_dynamic_batch(wrapper),
            opset_version=opset,
            external_data=False,
            verbose=False,  # no progress lines on stdout
        )
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """torch's ONNX exporter reports its progress and its optimiser's notes on stdout, stderr,
    warnings and loggers: none of it concerns the user (an export that fails raises)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _parity(wrapper: PlainTensorModel, data: bytes, format: str, names: list[str]) -> float:
    """The largest |exported - eager| over example inputs of two batch sizes; a ValueError above
    :data:`PARITY_TOLERANCE` (e.g. a graph that ignores a mask)."""
    worst = 0.0
    for batch_size, seed in ((4, 1), (7, 2)):
        inputs = example_inputs(wrapper, batch_size, seed)
        with torch.no_grad():
            expected = wrapper(*inputs).numpy()
        got = run_exported(data, format, inputs, names)
        if got.shape != expected.shape:
            raise ValueError(f"export: the {format} graph returned shape {got.shape}, expected {expected.shape}")
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        if not diff <= PARITY_TOLERANCE:
            raise ValueError(
                f"export: the {format} graph differs from the model by {diff:.3g} on masked rows (tolerance "
                f"{PARITY_TOLERANCE:g}); nothing was written"
            )
        worst = max(worst, diff)
    return worst


def run_exported(
    graph: bytes | str | os.PathLike, format: str, inputs: Sequence[Tensor], names: list[str]
) -> np.ndarray:
    """Run an exported graph (its bytes, or its file) on ``inputs`` (the wrapper's order):
    onnxruntime's CPU provider for ONNX, torch for TorchScript and ``torch.export`` programs."""
    source = graph if isinstance(graph, bytes) else open(graph, "rb").read()  # noqa: SIM115
    if format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    with torch.no_grad():
        if format == "torchscript":
            return torch.jit.load(io.BytesIO(source))(*inputs).numpy()
        return torch.export.load(io.BytesIO(source)).module()(*inputs).numpy()
