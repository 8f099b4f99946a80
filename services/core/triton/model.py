"""The ``model.py`` of every python-backend entry aimass writes (copied verbatim, kept thin).

Triton's python-backend stub runs in isolated mode and ignores PYTHONPATH, so
this file first puts the folders named by the model configuration's
``aimass_site_packages`` parameter (or the AIMASS_SITE_PACKAGES variable) on
``sys.path`` with ``site.addsitedir`` (which also runs their ``.pth`` files,
so editable installs resolve), then hands everything to
:class:`aimass.core.triton.pybackend.OnnxBatchRunner`, which tests import without
Triton. Nothing from aimass is imported at module level: the path is not set yet.
"""

from __future__ import annotations

import json
import os
import site
from typing import Any

SITE_PARAMETER = "aimass_site_packages"
THREADS_PARAMETER = "aimass_intra_op_threads"
MODEL_FILE = "model.onnx"


def _parameter(config: dict[str, Any], key: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", ""))


def _add_site_packages(config: dict[str, Any]) -> None:
    folders = _parameter(config, SITE_PARAMETER) or os.environ.get("AIMASS_SITE_PACKAGES", "")
    for folder in folders.split(os.pathsep):
        if folder:
            site.addsitedir(folder)


class TritonPythonModel:
    """Triton's python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        _add_site_packages(config)
        from aimass.core.triton.pybackend import OnnxBatchRunner

        threads = int(_parameter(config, THREADS_PARAMETER) or "1")
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        self.runner = OnnxBatchRunner(os.path.join(model_dir, MODEL_FILE), threads=threads)
        self.output_names = self.runner.output_names

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        feeds = []
        for request in requests:
            feed = {}
            for name in self.runner.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feed[name] = tensor.as_numpy()
            feeds.append(feed)
        responses = []
        for result in self.runner.run_batch(feeds):
            if isinstance(result, Exception):
                error = pb_utils.TritonError(f"{type(result).__name__}: {result}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensors = [pb_utils.Tensor(name, result[name]) for name in self.output_names]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.runner = None
