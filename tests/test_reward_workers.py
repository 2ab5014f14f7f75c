"""The mini judges scoring in worker processes (num_workers > 1) give exactly their in-process scores."""
import pickle

import pytest
import torch

from opd.bench_rewards import world_batch
from opd.rewards.aesthetic_mini import AestheticMini
from opd.rewards.geneval_mini import GenEvalMini
from opd.rewards.workers import ImageWorkers
from opd.utils.pieces import ordered_pieces


def noisy_batch(task, n=24, seed=0):
    """Renders of ``task``'s test prompts with noise and two images swapped between prompts, so that
    the scores spread (clean renders all score 1)."""
    images, prompts, rows = world_batch(task, n)
    images = (images + 0.15 * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    images[[0, 1]] = images[[1, 0]]
    return images, prompts, rows


@pytest.mark.parametrize(("reward_cls", "task"), [(GenEvalMini, "geneval"), (AestheticMini, "aesthetic")])
def test_scores_in_worker_processes_equal_the_in_process_scores(reward_cls, task):
    images, prompts, rows = noisy_batch(task)
    here, pooled = reward_cls(), reward_cls(num_workers=3)
    try:
        want, got = here.score(images, prompts, rows), pooled.score(images, prompts, rows)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
        assert want["reward"].std() > 0.05  # the scores vary, so order and values are both checked
        matrix_want = here.score_matrix(images[:7], rows[:5])
        matrix_got = pooled.score_matrix(images[:7], rows[:5])
        assert all(torch.equal(matrix_want[k], matrix_got[k]) for k in matrix_want)
        # a reward with running workers still pickles (DDP spawn, deep copies), without its processes
        clone = pickle.loads(pickle.dumps(pooled))
        assert clone.workers._pool is None and clone.workers.num_workers == 3
        assert torch.equal(clone.score(images[:4], prompts[:4], rows[:4])["reward"], want["reward"][:4])
        clone.workers.close()
    finally:
        pooled.workers.close()


def test_image_workers_map_in_order_and_check_their_count():
    workers = ImageWorkers(2, owner="test")
    try:
        assert workers.map(abs, [-3, 1, -2, 5, -7]) == [3, 1, 2, 5, 7]  # contiguous slices, back in order
        assert workers.map(abs, [-4]) == [4] and workers.map(abs, []) == []
    finally:
        workers.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"GenEvalMini: num_workers=.* must be an integer >= 1"):
            GenEvalMini(num_workers=bad)


def test_ordered_pieces_are_contiguous_nearly_equal_and_larger_first():
    assert ordered_pieces(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert ordered_pieces("abcd", 2) == ["ab", "cd"] and ordered_pieces([1, 2], 5) == [[1], [2]]
    assert ordered_pieces([], 4) == [[]] and ordered_pieces([1, 2, 3], 0) == [[1, 2, 3]]
