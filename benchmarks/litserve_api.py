"""The LitServe server of ``benchmarks/inference.py --part frameworks``: the same
:class:`attnfuse.serve.ModelService` (parsing, checks, model) behind LitServe's micro-batching, with
the limits of ``attnfuse serve`` (its defaults: 256 per batch, 2 ms, 1024 instances per request). LitServe
batches requests, not instances, and ``unbatch`` answers one row per request: the benchmark sends one
instance per request. A module of its own: LitServe runs the API in a spawned process, which must
import the class by name.

    python benchmarks/litserve_api.py MODEL_DIR PORT [DELAY]   # DELAY: seconds added to each model call
"""

from __future__ import annotations

import sys
import time

import litserve as ls
import numpy as np
from fastapi import HTTPException

from attnfuse.serve import ModelService, RequestError, ServeOptions

LIMITS = ServeOptions()  # attnfuse serve's defaults


class API(ls.LitAPI):
    def __init__(self, directory: str, delay: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.directory, self.delay = directory, delay

    def setup(self, device):
        self.service = ModelService(self.directory, "eager")

    def decode_request(self, request):
        try:
            return self.service.inputs(request, LIMITS.max_instances)[0]
        except RequestError as e:
            raise HTTPException(e.status, str(e)) from None

    def batch(self, inputs):
        return [np.concatenate(parts) for parts in zip(*inputs)]

    def predict(self, x):
        time.sleep(self.delay)
        return self.service.run(x)

    def unbatch(self, output):
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output):
        return self.service.answer(output)


if __name__ == "__main__":
    directory, port = sys.argv[1], int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    api = API(directory, delay, max_batch_size=LIMITS.max_batch, batch_timeout=LIMITS.batch_wait_ms / 1000)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
        port=port, generate_client_file=False, log_level="warning"
    )
