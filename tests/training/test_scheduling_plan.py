"""The admission rules on their own: what fits, what is refused and why, who goes first."""

from __future__ import annotations

import pytest
import torch

from aimass.core.errors import FailedPrecondition, InvalidArgument
from aimass.training import scheduling
from aimass.training.scheduling import Admitted, Candidate, FreeWorker
from aimass.training.v1 import training_pb2 as tpb

GIB = 1 << 30
SMALL = tpb.Resources(cpus=2, memory_bytes=4 * GIB, labels={"zone": "a"})
BIG = tpb.Resources(cpus=32, memory_bytes=256 * GIB, gpus=8, gpu_type="H100 80GB HBM3")


def test_misfit_names_the_first_field_the_offer_cannot_meet():
    assert scheduling.misfit(tpb.Resources(), SMALL) is None
    assert scheduling.misfit(tpb.Resources(gpus=1), SMALL) == "gpus"
    assert scheduling.misfit(tpb.Resources(gpus=1, gpu_type="h100"), BIG) is None
    assert scheduling.misfit(tpb.Resources(gpus=1, gpu_type="A10G"), BIG) == "gpu_type"
    assert scheduling.misfit(tpb.Resources(cpus=4), SMALL) == "cpus"
    assert scheduling.misfit(tpb.Resources(memory_bytes=8 * GIB), SMALL) == "memory_bytes"
    assert scheduling.misfit(tpb.Resources(labels={"zone": "b"}), SMALL) == "labels.zone"
    assert scheduling.misfit(tpb.Resources(labels={"zone": "a"}), SMALL) is None
    # processes: 0 in an offer states no limit; a request of 0 means 1.
    assert scheduling.misfit(tpb.Resources(processes=64), SMALL) is None
    limited = tpb.Resources(processes=2)
    assert scheduling.misfit(tpb.Resources(), limited) is None
    assert scheduling.misfit(tpb.Resources(processes=3), limited) == "processes"


def test_refusal_names_the_field_and_the_largest_offer():
    offers = [("workers/small", SMALL), ("workers/big", BIG)]
    with pytest.raises(FailedPrecondition) as caught:
        scheduling.check_satisfiable(tpb.Resources(gpus=16), offers)
    assert caught.value.message.startswith("training_job.resources.gpus:")
    assert "largest offer is 8 (workers/big)" in caught.value.message

    with pytest.raises(FailedPrecondition) as caught:
        scheduling.check_satisfiable(tpb.Resources(memory_bytes=512 * GIB), offers)
    assert "resources.memory_bytes" in caught.value.message
    assert "256.0 GiB (workers/big)" in caught.value.message

    with pytest.raises(FailedPrecondition) as caught:
        scheduling.check_satisfiable(tpb.Resources(gpus=1, gpu_type="A10G"), offers)
    assert "resources.gpu_type" in caught.value.message
    assert "H100 80GB HBM3" in caught.value.message

    with pytest.raises(FailedPrecondition) as caught:
        scheduling.check_satisfiable(tpb.Resources(labels={"zone": "c"}), offers)
    assert "resources.labels.zone" in caught.value.message

    # Each field is met by some worker, but no worker meets them all.
    with pytest.raises(FailedPrecondition) as caught:
        scheduling.check_satisfiable(tpb.Resources(gpus=1, labels={"zone": "a"}), offers)
    assert "no single registered worker" in caught.value.message
    assert "workers/small lacks gpus" in caught.value.message

    with pytest.raises(FailedPrecondition) as caught:
        scheduling.check_satisfiable(tpb.Resources(hosts=2, gpus=1), offers)
    assert "resources.hosts: asks for 2 hosts but only 1" in caught.value.message

    with pytest.raises(InvalidArgument):
        scheduling.check_satisfiable(tpb.Resources(cpus=-1), offers)


def test_nothing_is_refused_before_any_worker_registered():
    scheduling.check_satisfiable(tpb.Resources(gpus=64, gpu_type="B200"), [])
    scheduling.check_satisfiable(tpb.Resources(gpus=8), [("workers/big", BIG)])


def test_resource_class_is_stable_per_offer_or_named():
    same = tpb.Resources()
    same.CopyFrom(SMALL)
    assert scheduling.resource_class(SMALL) == scheduling.resource_class(same)
    assert scheduling.resource_class(SMALL) != scheduling.resource_class(BIG)
    assert scheduling.resource_class(SMALL).startswith("auto-")
    assert scheduling.resource_class(BIG, "gpu-h100") == "gpu-h100"
    with pytest.raises(InvalidArgument):
        scheduling.resource_class(BIG, "gpu.h100")
    assert scheduling.class_topic("aimassjobs.training", "gpu-h100") == (
        "aimassjobs.training.gpu-h100"
    )


def _free(name: str, offer: tpb.Resources, klass: str = "") -> FreeWorker:
    return FreeWorker(name, klass or name, offer)


def test_plan_takes_jobs_in_order_and_smallest_fitting_worker_first():
    free = [_free("big", BIG), _free("small", SMALL)]
    jobs = [
        Candidate(1, "", tpb.Resources()),  # fits both: gets the small one
        Candidate(2, "", tpb.Resources(gpus=1)),
        Candidate(3, "", tpb.Resources()),  # nothing left
    ]
    decision = scheduling.plan(jobs, free, Admitted(), {})
    assert [(job.key, [w.name for w in workers]) for job, workers in decision.releases] == [
        (1, ["small"]),
        (2, ["big"]),
    ]
    assert decision.waiting == {3: "waiting for a free worker that fits"}


def test_plan_lets_a_later_job_past_one_no_free_worker_fits():
    decision = scheduling.plan(
        [Candidate(1, "", tpb.Resources(gpus=1)), Candidate(2, "", tpb.Resources())],
        [_free("small", SMALL)],
        Admitted(),
        {},
    )
    assert [job.key for job, _ in decision.releases] == [2]
    assert 1 in decision.waiting


def test_plan_keeps_projects_within_their_quota():
    free = [_free(f"w{i}", SMALL, "cpu") for i in range(4)]
    admitted = Admitted()
    admitted.by_project["vision"] = 1
    jobs = [
        Candidate(1, "vision", tpb.Resources()),
        Candidate(2, "nlp", tpb.Resources()),
        Candidate(3, "nlp", tpb.Resources()),
        Candidate(4, "nlp", tpb.Resources()),
        Candidate(5, "", tpb.Resources()),
    ]
    decision = scheduling.plan(jobs, free, admitted, {"vision": 1}, default_quota=2)
    assert [job.key for job, _ in decision.releases] == [2, 3, 5]
    assert decision.waiting[1] == "waiting: project 'vision' runs 1 of its 1 concurrent jobs"
    assert "runs 2 of its 2" in decision.waiting[4]


def test_plan_spreads_a_job_across_hosts_and_limits_parallel_trials():
    free = [_free(f"w{i}", SMALL, "cpu") for i in range(3)]
    two_hosts = Candidate(1, "", tpb.Resources(hosts=2))
    decision = scheduling.plan([two_hosts], free, Admitted(), {})
    assert [w.name for w in decision.releases[0][1]] == ["w0", "w1"]

    trials = [Candidate(k, "", tpb.Resources(), parent=7, max_parallel=2) for k in (1, 2, 3)]
    decision = scheduling.plan(trials, free, Admitted(), {})
    assert [job.key for job, _ in decision.releases] == [1, 2]
    assert decision.waiting[3] == "waiting: 2 trials of the search already run"


def test_reserved_workers_are_taken_by_class():
    free = [_free("a1", SMALL, "a"), _free("a2", SMALL, "a"), _free("b1", BIG, "b")]
    left = scheduling.take_reserved(free, ["a", "b", "c"])
    assert [w.name for w in left] == ["a2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_worker_offers_the_gpus_of_its_host_and_gpu_jobs_fit_it():
    offer = scheduling.detect_offer()
    assert offer.gpus == torch.cuda.device_count()
    assert offer.gpu_type == torch.cuda.get_device_name(0).removeprefix("NVIDIA ").strip()
    assert scheduling.misfit(tpb.Resources(gpus=1, gpu_type=offer.gpu_type), offer) is None
    assert scheduling.misfit(tpb.Resources(gpus=offer.gpus + 1), offer) is not None
