"""The training loop on a GPU: a job with ``resources.gpus`` trains on CUDA, follows the CPU
curve, resumes, reduces over nccl (one GPU per rank) or gloo (ranks sharing a GPU), and
exports files that load on a host without one. A GPU job on a host without CUDA fails
with the field named instead of training on the CPU.

The GPU tests run where CUDA is present (the lent GPU machine); CI has none, so there only
the refusal runs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from aimass.training.ddp import run_distributed
from aimass.training.trainer import Trainer, TrainingFailed, process_group_backend
from tests.training.test_trainer_loop import MLP, Hooks, digits_source, plan

__all__ = ["digits_source"]  # the fixture, imported for pytest

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
QUICK = {"epochs": 2, "batch_size": 32, "seed": 3}
# 8 epochs at this rate reach 0.87 on the held-out rows on the CPU (0.78 at the default).
LEARN = {"epochs": 8, "batch_size": 32, "seed": 0, "optimizer": {"learning_rate": 0.01}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_a_gpu_job_on_a_host_without_cuda_fails_naming_the_field(digits_source, tmp_path):
    source, data = digits_source
    with pytest.raises(TrainingFailed, match=r"training_job\.resources\.gpus"):
        Trainer(plan(data, tmp_path, MLP, QUICK, device="cuda"), source, Hooks()).run()
    assert process_group_backend("cuda", 2) == "gloo"


@needs_cuda
def test_a_gpu_run_learns_digits_and_exports_files_for_the_cpu(digits_source, tmp_path):
    source, data = digits_source
    hooks = Hooks()
    result = Trainer(
        plan(data, tmp_path, MLP, LEARN, device="cuda", export=True), source, hooks
    ).run()
    assert any(line.startswith("training on cuda:0") for line in hooks.lines), hooks.lines
    assert result.metrics["valid_accuracy"] > 0.85
    state = torch.load(result.state_dict_path, map_location="cpu", weights_only=True)
    assert {t.device.type for t in state.values()} == {"cpu"}
    session = ort.InferenceSession(result.onnx_path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()
    assert result.onnx_max_abs_diff < 1e-4


@needs_cuda
def test_the_gpu_follows_the_cpu_loss_curve(digits_source, tmp_path):
    source, data = digits_source
    cpu = Trainer(plan(data, tmp_path, MLP, QUICK), source, Hooks()).run()
    gpu = Trainer(plan(data, tmp_path, MLP, QUICK, device="cuda"), source, Hooks()).run()
    assert len(gpu.losses) == len(cpu.losses)
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-3, atol=1e-4)
    assert gpu.metrics["valid_accuracy"] == pytest.approx(cpu.metrics["valid_accuracy"], abs=0.01)


@needs_cuda
def test_bf16_mixed_precision_runs_under_cuda_autocast(digits_source, tmp_path):
    source, data = digits_source
    config = {**LEARN, "precision": "bf16_mixed"}
    result = Trainer(plan(data, tmp_path, MLP, config, device="cuda"), source, Hooks()).run()
    assert all(np.isfinite(result.losses))
    assert result.metrics["valid_accuracy"] > 0.8


@needs_cuda
def test_a_gpu_run_resumed_from_a_checkpoint_continues_the_same_curve(digits_source, tmp_path):
    source, data = digits_source
    spec = {"mlp": {"hidden_sizes": [32], "dropout": 0.3}}
    config = {**QUICK, "epochs": 3, "checkpoint_interval_steps": 7}
    hooks = Hooks()
    full = Trainer(plan(data, tmp_path, spec, config, device="cuda"), source, hooks).run()
    step, blob = hooks.checkpoints[2]
    saved = tmp_path / "resume.pt"
    saved.write_bytes(blob)
    resumed = Trainer(
        plan(data, tmp_path, spec, config, device="cuda", resume_from=str(saved)),
        source,
        Hooks(),
    ).run()
    # Dropout masks continue from the saved CUDA generator, so the tail is the same steps.
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5, atol=1e-6)
    assert step == 21


@needs_cuda
@pytest.mark.parametrize("world", [1, 2])
def test_data_parallel_on_the_gpu_follows_the_one_process_curve(digits_source, tmp_path, world):
    source, data = digits_source
    global_batch = 64
    single = Trainer(
        plan(data, tmp_path, MLP, {**QUICK, "batch_size": global_batch}, device="cuda"),
        source,
        Hooks(),
    ).run()
    hooks = Hooks()
    config = {**QUICK, "batch_size": global_batch // world}
    parallel = run_distributed(
        plan(data, tmp_path, MLP, config, device="cuda"), source, hooks, world=world
    )
    # One rank per GPU reduces over nccl; two ranks on one GPU share it over gloo.
    expected = process_group_backend("cuda", world)
    assert f"process group: {world} ranks over {expected}" in hooks.lines
    if world <= torch.cuda.device_count():
        assert expected == "nccl"
    np.testing.assert_allclose(parallel.losses, single.losses, rtol=1e-4, atol=1e-5)
