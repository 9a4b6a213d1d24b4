"""CoatAdamW on FSDP2 DTensor shards, two gloo CPU processes: each rank's update is exactly a
single-process CoatAdamW step on its shard, and the sharded state resumes exactly through DCP."""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memwise.checkpoint import safe_load
from memwise.context import Workload
from memwise.planner import estimate, meta_model
from memwise.sharding import read_metadata
from memwise.testing import DDP, MICRO, read_metrics, run_cli
from memwise_coat import CoatPlugin

SCRIPT = r'''
import os, sys
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from memwise_coat import CoatAdamW
from memwise_coat.state import CoatState, local_tensor
from memwise_coat.state_bytes import coat_param_state_bytes


def build(mesh):
    torch.manual_seed(0)
    # 37 rows: uneven shards (19 and 18 rows); 50 columns: groups of 128 cross rows and the shard edge
    model = torch.nn.Sequential(torch.nn.Linear(50, 37), torch.nn.Linear(37, 64, bias=False))
    fully_shard(model, mesh=mesh)
    return model, CoatAdamW(model.parameters(), lr=1e-2, min_numel=1000)


def train(model, opt, steps, start=0, refs=None):
    for step in range(start, start + steps):
        x = torch.randn(8, 50, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        if refs is not None:  # the same step, single-process, on plain copies of each local shard
            for p, (q, ref) in zip(model.parameters(), refs):
                q.grad = p.grad.to_local().clone()
                ref.step()
        opt.step()
        opt.zero_grad()
        if refs is not None:
            for p, (q, ref) in zip(model.parameters(), refs):
                assert torch.equal(p.to_local(), q.detach()), step
                mine, theirs = opt.state[p], ref.state[q]
                local = CoatState.of_group(opt.param_groups[0]).local(mine)
                assert sorted(local) == sorted(theirs)
                for key in theirs:
                    assert torch.equal(local[key].view(-1).float(), theirs[key].view(-1).float()), (step, key)


def main(rank, world, folder, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model, opt = build(mesh)
    refs = []
    for p in model.parameters():
        q = torch.nn.Parameter(p.to_local().detach().clone())
        refs.append((q, CoatAdamW([q], lr=1e-2, min_numel=0 if p.numel() >= 1000 else 10**9)))
    train(model, opt, 3, refs=refs)
    quantized = [CoatState.of_group(opt.param_groups[0]).local(opt.state[p])["exp_avg"].dtype for p in model.parameters()]
    assert quantized == [torch.float8_e4m3fn, torch.float32, torch.float8_e4m3fn], quantized
    # the largest shard's bytes (rank 0: 19 of 37 rows) are what the estimate predicts per rank
    layout = CoatState.of_group(opt.param_groups[0])
    held = sum(local_tensor(t).nbytes for p in model.parameters() for t in opt.state[p].values())
    predicted = sum(coat_param_state_bytes(p, q == torch.float8_e4m3fn, layout, 2)
                    for p, q in zip(model.parameters(), quantized))
    assert (held == predicted) if rank == 0 else (held < predicted), (rank, held, predicted)
    # save at step 3 through DCP, as Lightning's ModelParallelStrategy does
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)
    after = [p.detach().to_local().clone() for p in model.parameters()]
    train(model, opt, 3, start=3)
    fresh, resumed = build(mesh)
    with torch.no_grad():
        for p, saved in zip(fresh.parameters(), after):
            p.to_local().copy_(saved)
    state = {"optimizer": get_optimizer_state_dict(fresh, resumed)}
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(fresh, resumed, optim_state_dict=state["optimizer"])
    assert resumed.state[next(fresh.parameters())]["exp_avg"].dtype == torch.float8_e4m3fn
    train(fresh, resumed, 3, start=3)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
    print(f"rank {rank} exact", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(main, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_each_rank_steps_its_shard_exactly_and_dcp_resume_is_exact(tmp_path):
    script = tmp_path / "coat_fsdp.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(_free_port())],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "rank 0 exact" in out.stdout and "rank 1 exact" in out.stdout


# --- through the CLI: FSDP2 + COAT against DDP + COAT -------------------------------------------

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "coat.yaml")
FSDP = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
STEPS = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"]


def _run(folder: Path, *args: str) -> Path:
    proc = run_cli("run", RECIPE, f"report.dir={folder}", *MICRO, *STEPS, *args, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("coat_fsdp")
    return {"ddp": _run(base / "ddp", *DDP), "fsdp": _run(base / "fsdp", *FSDP)}


def _losses(folder: Path) -> list[tuple[int, float, float]]:
    return [(int(r["step"]), float(r["train_loss"] or "nan"), float(r["val_loss"] or "nan"))
            for r in read_metrics(folder)]


@pytest.mark.slow
def test_fsdp_losses_equal_ddp(runs):
    """On this model every shard edge falls on a group boundary (shards of whole rows of 64 or
    128 elements, even row counts), so FSDP's groups are DDP's and the two runs differ only by the
    fp32 round-off of the gradient reduction: the baseline's tolerance."""
    ddp, fsdp = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) > 0 and [r[0] for r in ddp] == [r[0] for r in fsdp]
    for a, b in zip(ddp, fsdp):
        for x, y in zip(a[1:], b[1:]):
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-5 * abs(x), (ddp, fsdp)


@pytest.mark.slow
def test_fsdp_per_rank_state_is_half_of_ddp(runs):
    """Per rank: half of DDP's parameters and gradients, and half of each FP8 payload, per-group
    metadata and fp32 moment of DDP's optimizer state; the scalar step stays whole on each rank."""
    ddp = json.loads((runs["ddp"] / "memory.json").read_text())["measured"]["after_step"]
    saved = safe_load(runs["ddp"] / "checkpoints" / "last.ckpt")
    states = saved["optimizer_states"][0]["state"].values()
    assert any(s["exp_avg"].dtype == torch.float8_e4m3fn for s in states)
    steps = sum(s["step"].nbytes for s in states)
    sharded = sum(t.nbytes for s in states for k, t in s.items() if k != "step")
    assert ddp["optimizer_state"] == steps + sharded
    buffers = ddp["parameters"] - ddp["gradients"]  # every parameter trains
    for rank in (0, 1):
        mem = json.loads((runs["fsdp"] / f"memory-rank{rank}.json").read_text())
        assert mem["world_size"] == 2
        fsdp = mem["measured"]["after_step"]
        assert 2 * fsdp["gradients"] == ddp["gradients"]
        assert 2 * (fsdp["parameters"] - buffers) == ddp["parameters"] - buffers
        assert 2 * (fsdp["optimizer_state"] - steps) == sharded
    # the planner's per-rank prediction (memwise plan --devices 2) is the measured state, to the byte
    config = read_metadata(runs["fsdp"] / "checkpoints" / "last.ckpt")["memwise"]["model_config"]
    predicted = estimate(meta_model(config), [CoatPlugin(activations=False)], Workload(4, 64), devices=2)
    assert predicted.estimate.optimizer_state == fsdp["optimizer_state"]


@pytest.mark.slow
def test_fsdp_resume_is_exact(runs, tmp_path):
    ckpt = runs["fsdp"] / "checkpoints" / "step-000002.ckpt"
    assert (ckpt / ".metadata").is_file()
    resumed = _run(tmp_path / "resumed", *FSDP, f"resume={ckpt}")
    full, again = read_metrics(runs["fsdp"]), read_metrics(resumed)
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in full] == \
        [(r["step"], r["train_loss"], r["val_loss"]) for r in again]
