"""Two gloo processes compute the same GRPO advantages as one process (groups span ranks)."""
import os
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opd.data.prompts import rank_slice, round_groups
from opd.modules.online_rl import OnlineRL

NUM_GROUPS, GROUP_SIZE = 6, 4


def round_rewards(prompt_ids: torch.Tensor) -> torch.Tensor:
    """Rewards that differ within groups (a fixed function of position and prompt)."""
    return torch.sin(torch.arange(prompt_ids.numel(), dtype=torch.float32) * 1.7) + 0.1 * prompt_ids


def fake_module(rank: int, world: int, global_std: bool):
    """Just what ``OnlineRL.advantages`` touches, with a real collective behind ``all_gather``."""
    def all_gather(tensor):
        if world == 1:
            return tensor.unsqueeze(0)
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor)
        return torch.stack(out)
    return types.SimpleNamespace(all_gather=all_gather, global_rank=rank, global_std=global_std,
                                 trainer=types.SimpleNamespace(world_size=world))


def local_advantages(rank: int, world: int, global_std: bool) -> torch.Tensor:
    prompt_ids, group_ids = round_groups(50, NUM_GROUPS, GROUP_SIZE, seed=3, round_idx=7)
    rewards = round_rewards(prompt_ids)
    module = fake_module(rank, world, global_std)
    return OnlineRL.advantages(module, rank_slice(rewards, rank, world), rank_slice(group_ids, rank, world))


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for global_std in (True, False):
            torch.save(local_advantages(rank, world, global_std), os.path.join(out_dir, f"{rank}_{global_std}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_advantages(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    _, group_ids = round_groups(50, NUM_GROUPS, GROUP_SIZE, seed=3, round_idx=7)
    first_half = set(rank_slice(group_ids, 0, 2).tolist())
    assert first_half & set(rank_slice(group_ids, 1, 2).tolist())  # some group spans both ranks
    for global_std in (True, False):
        single = local_advantages(0, 1, global_std)
        two = torch.cat([torch.load(tmp_path / f"{r}_{global_std}.pt", weights_only=True) for r in range(2)])
        torch.testing.assert_close(two, single, rtol=0, atol=0)
        assert single.abs().sum() > 0
