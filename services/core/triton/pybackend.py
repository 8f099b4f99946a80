"""The logic of the Triton python-backend model that runs ONNX Runtime (no Triton import).

The CPU Triton of the nvidia-pytriton wheel has only the python backend, so
each served version gets a thin ``model.py`` (see :mod:`aimass.core.triton.model`)
that hands the requests of one dynamic batch to :class:`OnnxBatchRunner`:
the inputs of all requests are concatenated along the batch axis, run in one
ONNX Runtime call and split back, so Triton's dynamic batching turns into one
larger inference. A request that cannot join the batch (other trailing
shape, missing input) is run on its own and fails alone: errors are per
request, never per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

Feed = Mapping[str, np.ndarray]
Result = dict[str, np.ndarray] | Exception


class OnnxBatchRunner:
    """Runs batches of requests through one ONNX Runtime session."""

    def __init__(self, model_path: str | Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        """One request: inputs by name -> outputs by name."""
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise ValueError(f"inputs: missing {', '.join(missing)}")
        outputs = self.session.run(self.output_names, {n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))

    def run_batch(self, feeds: Sequence[Feed]) -> list[Result]:
        """Many requests, one result (outputs or the request's own error) each, in order."""
        if len(feeds) == 1:
            return [self._run_alone(feeds[0])]
        if not self._stackable(feeds):
            return [self._run_alone(feed) for feed in feeds]
        sizes = [int(feed[self.input_names[0]].shape[0]) for feed in feeds]
        merged = {n: np.concatenate([feed[n] for feed in feeds]) for n in self.input_names}
        try:
            outputs = self.run(merged)
        except Exception:  # one bad request must not fail the others: run each alone
            return [self._run_alone(feed) for feed in feeds]
        return split_outputs(outputs, sizes)

    def _run_alone(self, feed: Feed) -> Result:
        try:
            return self.run(feed)
        except Exception as err:
            return err

    def _stackable(self, feeds: Sequence[Feed]) -> bool:
        """Every request has every input, one batch size each, and equal trailing dims."""
        first = feeds[0]
        for name in self.input_names:
            if name not in first or first[name].ndim == 0:
                return False
        for feed in feeds:
            if any(name not in feed for name in self.input_names):
                return False
            batch = {feed[n].shape[0] for n in self.input_names if feed[n].ndim > 0}
            if len(batch) != 1:
                return False
            for name in self.input_names:
                tensor, reference = feed[name], first[name]
                if tensor.ndim == 0 or tensor.shape[1:] != reference.shape[1:]:
                    return False
                if tensor.dtype != reference.dtype:
                    return False
        return True


def split_outputs(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[Result]:
    """Cuts each output along the batch axis back into the requests' sizes."""
    offsets = np.cumsum([0, *sizes])
    return [
        {name: value[offsets[i] : offsets[i + 1]] for name, value in outputs.items()}
        for i in range(len(sizes))
    ]
