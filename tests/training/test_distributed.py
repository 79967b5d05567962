"""torchrun set-up shared by data extraction and training (`distributed.py`): the backend follows the device, each
process takes the GPU of its LOCAL_RANK and makes it current, and only a process group initialised here is
destroyed here. No GPU is needed: CUDA and the process group are replaced by recorders where a test says so."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hass_deploy.errors import HassDeployError
from hass_deploy.training import extract, trainer
from hass_deploy.training.distributed import Ranks, backend_for, process_device

TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


class Stop(Exception):
    """Raised by a recorder once it has seen what the test needs."""


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with 2 visible GPUs and a process group that is only recorded: what each call was given."""
    seen: dict[str, list] = {"init": [], "set_device": [], "destroy": []}
    live = []  # a group exists while this is not empty

    def init(backend=None, **kwargs):
        seen["init"].append(backend)
        live.append(backend)

    def destroy(*args):
        seen["destroy"].append(live.pop())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen["set_device"].append(torch.device(device)))
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(live))
    return seen


def test_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for(torch.device("cuda", 3)) == "nccl"


def test_cuda_means_the_gpu_of_the_local_rank():
    assert process_device("cuda", 3) == torch.device("cuda", 3)
    assert process_device("cuda:1", 3) == torch.device("cuda", 1)  # an explicit GPU is taken as given
    assert process_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(HassDeployError, match="--device must be cpu, cuda or cuda:N"):
        process_device("gpu", 0)


def test_cpu_training_on_a_gpu_machine_gets_gloo(fake_gpus):
    ranks = Ranks.from_environment("cpu", TORCHRUN)
    assert fake_gpus["init"] == ["gloo"] and fake_gpus["set_device"] == []
    assert (ranks.rank, ranks.world, ranks.device, ranks.owns_group) == (1, 2, torch.device("cpu"), True)
    assert ranks.collective_device == torch.device("cpu")


def test_each_rank_takes_and_makes_current_the_gpu_of_its_local_rank(fake_gpus):
    ranks = Ranks.from_environment("cuda", {**TORCHRUN, "RANK": "3"})  # global rank 3 is local rank 1 of node 2
    assert ranks.device == torch.device("cuda", 1) and ranks.collective_device == torch.device("cuda", 1)
    assert fake_gpus["set_device"] == [torch.device("cuda", 1)] and fake_gpus["init"] == ["nccl"]
    ranks.close()
    single = Ranks.from_environment("cuda", {})
    assert (single.world, single.device, single.backend) == (1, torch.device("cuda", 0), None)


def test_gpu_problems_are_one_line_errors(fake_gpus, monkeypatch):
    with pytest.raises(HassDeployError, match=r"--device cuda means cuda:2 here, but this machine has 2 GPU"):
        Ranks.from_environment("cuda", {**TORCHRUN, "LOCAL_RANK": "2"})
    with pytest.raises(HassDeployError, match="RANK='one' is not an integer"):
        Ranks.from_environment("cpu", {**TORCHRUN, "RANK": "one"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HassDeployError, match="--device cuda: this torch sees no CUDA device"):
        Ranks.from_environment("cuda", {})
    assert fake_gpus["init"] == []  # refused before any process group exists


def test_only_a_group_initialised_here_is_destroyed_here(tmp_path):
    """A caller's group (accelerate's, a script's) is used as it is and survives `close()`."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with Ranks.from_environment("cpu", {"WORLD_SIZE": "2", "RANK": "1"}) as ranks:  # the group wins
            assert (ranks.rank, ranks.world, ranks.backend, ranks.owns_group) == (0, 1, "gloo", False)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_extraction_and_training_load_on_the_local_ranks_gpu(fake_gpus, monkeypatch, tmp_path):
    """Both entry points go through `Ranks`: NCCL, cuda:LOCAL_RANK made current, the model loaded there."""
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    loaded: list[str] = []

    def load_target(path, dtype, device):
        loaded.append((dtype, str(device)))
        raise Stop

    monkeypatch.setattr(extract, "load_target", load_target)
    (tmp_path / "ids.jsonl").write_text('{"ids": [1, 2, 3]}\n')
    with pytest.raises(Stop):
        extract.generate_data(tmp_path, tmp_path / "ids.jsonl", tmp_path / "out",
                              extract.DataConfig(format="ids", device="cuda"))
    assert loaded == [("bf16", "cuda:1")]  # compute dtype auto: bf16 on a GPU
    assert fake_gpus["set_device"] == [torch.device("cuda", 1)] and fake_gpus["init"] == ["nccl"]
    assert fake_gpus["destroy"] == ["nccl"]  # its own group, torn down even on failure

    monkeypatch.setattr(trainer, "load_target_head", lambda path: (_ for _ in ()).throw(Stop))
    with pytest.raises(Stop):
        trainer.train(tmp_path, tmp_path, tmp_path / "draft", device="cuda", progress=False)
    assert fake_gpus["set_device"][-1] == torch.device("cuda", 1) and fake_gpus["init"] == ["nccl", "nccl"]
    assert fake_gpus["destroy"] == ["nccl", "nccl"]
