"""Names of the Triton model-repository entries routing serves versions under.

The repository itself (signatures, ``config.pbtxt``, the entry writer, the
python-backend wrapper) is shared with compression's Triton check and lives in
:mod:`aimass.core.triton.repository`; its names are re-exported here.
"""

from __future__ import annotations

import hashlib
import re

from aimass.core.errors import InvalidArgument
from aimass.core.triton.repository import (
    MARKER,
    MODEL_FILE,
    ONNX_TYPES,
    TRITON_TYPES,
    TRITON_VERSION,
    Backend,
    ModelRepository,
    ServingOptions,
    Signature,
    TensorInfo,
    render_config,
    signature_from_onnx,
    site_packages,
)

__all__ = [
    "MARKER",
    "MODEL_FILE",
    "ONNX_TYPES",
    "TRITON_TYPES",
    "TRITON_VERSION",
    "Backend",
    "ModelRepository",
    "ServingOptions",
    "Signature",
    "TensorInfo",
    "entry_name",
    "render_config",
    "signature_from_onnx",
    "site_packages",
    "triton_model_name",
]


def triton_model_name(model_version: str) -> str:
    """``models/digits/versions/3`` -> ``digits-v3`` (unique per version, a valid folder name)."""
    match = re.fullmatch(r"models/([a-z][a-z0-9-]{0,62})/versions/(\d+)", model_version)
    if match is None:
        raise InvalidArgument(
            "model_version", f"{model_version!r} is not models/{{m}}/versions/{{n}}"
        )
    return f"{match.group(1)}-v{match.group(2)}"


def entry_name(model_version: str, options: ServingOptions) -> str:
    """The repository entry of a version served with ``options``: ``digits-v3-1a2b3c4d``.

    The suffix hashes what config.pbtxt carries (batching, instance groups), so
    two deployments of one version with different serving configs get two
    entries instead of sharing whichever was loaded last; with equal configs
    they share one.
    """
    shaped = (
        options.max_batch_size,
        options.dynamic_batching,
        options.max_queue_delay_us if options.dynamic_batching else 0,
        options.preferred_batch_sizes if options.dynamic_batching else (),
        options.instance_count,
        options.instance_kind,
        sorted(options.extra.items()),
    )
    digest = hashlib.blake2b(repr(shaped).encode(), digest_size=4).hexdigest()
    return f"{triton_model_name(model_version)}-{digest}"
