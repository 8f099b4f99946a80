"""Serving ONNX models through NVIDIA Triton, shared by routing and compression.

- :mod:`.repository`: signatures, ``config.pbtxt`` rendering and the model
  repository folder aimass writes entries into (atomically, marked as ours);
- :mod:`.s3_repository`: the same entries on S3 (``s3://bucket/prefix`` or Triton's
  ``s3://host:port/bucket/prefix``), which Triton reads itself;
- :mod:`.model` and :mod:`.pybackend`: the python-backend wrapper copied into
  each entry for the CPU Triton of the nvidia-pytriton wheel, and the ONNX
  Runtime batching logic it runs;
- :mod:`.control`: load, unload, readiness and inference over gRPC, and
  :class:`~.control.TritonTarget` (which Triton, from the environment);
- :mod:`.acceptance`: "does Triton accept this ONNX file", used before a model
  is registered.

Nothing here imports tritonclient at module level: :mod:`.model` runs inside
Triton's stub, and processes without Triton import these modules too.
"""
