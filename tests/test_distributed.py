"""Distributed training on CPU: 2 processes, gloo over loopback, each on its half of the batch, must end
where one process on the whole batch ends. FSDP2 as users apply it to PEFT models (`fully_shard` on each
decoder layer, then on the root), with and without gradient checkpointing, and DDP. The adapter is saved
from the sharded model on rank 0 in PEFT's format."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import peftfx
from conftest import CONFIGS, batch

WORLD = 2
STEPS = 2
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(folder: str, gc: bool):
    torch.manual_seed(0)  # the same LoRA weights in every process
    base = CONFIGS["llama"][0].from_pretrained(folder)
    if gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peftfx.apply(base, peftfx.LoraConfig(**LORA)).train()


def _train(pm, rows: slice) -> list[float]:
    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    losses = []
    for step in range(STEPS):
        kw = batch(4, 10, seed=step, pad=False)
        kw = {k: v[rows] for k, v in kw.items()}
        loss = pm(labels=kw["input_ids"], **kw).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _worker(rank: int, folder: str, mode: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        pm = _model(folder, gc=mode == "fsdp_gc")
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(pm)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in pm.get_base_model().model.layers:
                fully_shard(layer, mesh=mesh)
            model = fully_shard(pm, mesh=mesh)
        per_rank = 4 // WORLD
        _train(model, slice(rank * per_rank, (rank + 1) * per_rank))
        pm.save_pretrained(out, is_main_process=rank == 0)  # every rank: the shards are gathered
    finally:
        dist.destroy_process_group()


def _run(folder: str, mode: str, out: str) -> None:
    context = mp.start_processes(_worker, args=(folder, mode, _free_port(), out), nprocs=WORLD, join=False,
                                 start_method="spawn")
    finished = False
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not finished:
        finished = context.join(timeout=5)
        if not finished and time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{mode}: the 2 processes did not finish in {TIMEOUT_S} s")


@pytest.mark.slow  # about 25 s each (2 spawned processes): the default run stays under its 20 minutes
@pytest.mark.parametrize("mode", ["fsdp_gc", "fsdp", "ddp"])
def test_two_processes_end_where_one_process_ends(model_dirs, tmp_path, mode):
    out = str(tmp_path / "adapter")
    _run(model_dirs["llama"], mode, out)
    reference = _model(model_dirs["llama"], gc=False)
    start = {k: v.clone() for k, v in peftfx.get_peft_model_state_dict(reference).items()}
    _train(reference, slice(0, 4))
    reference.save_pretrained(str(tmp_path / "reference"))
    got = load_file(os.path.join(out, "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(got) == 3 * 2 * 3  # 3 layers x 3 targets x (A, B)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = [k for k, v in peftfx.get_peft_model_state_dict(reference).items() if not torch.equal(v, start[k])]
    assert len(moved) == len(want)  # training moved every adapter tensor, so the comparison means something
    loaded = peftfx.load(CONFIGS["llama"][0].from_pretrained(model_dirs["llama"]).eval(), out)
    reference.eval()
    kw = batch(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).logits, reference(**kw).logits, rtol=1e-5, atol=1e-5)
