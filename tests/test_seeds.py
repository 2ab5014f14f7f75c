"""The one seed function: named streams, no shared seeds, evaluation noise unchanged."""
import itertools

import pytest
import torch

from opd.evaluation.seeds import image_seed
from opd.utils.seeds import EVAL_IMAGE, ROLLOUT, TEACHER_PROMPTS, stream_seed


def test_evaluation_image_seeds_keep_their_values():
    # the values image_seed gave before the streams moved to stream_seed: evaluation noise did not change
    assert image_seed(0, 0, 0) == 1445694884619442965
    assert image_seed(7, 123, 3) == 1837184900638213445 == stream_seed(EVAL_IMAGE, 7, 123, 3)


def test_streams_are_pure_63_bit_and_do_not_share_seeds():
    assert stream_seed(ROLLOUT, 1, 2, 3, 4) == stream_seed(ROLLOUT, 1, 2, 3, 4)
    tuples = list(itertools.product(range(3), range(4), range(2), range(3)))
    seeds = {(name, t): stream_seed(name, *t) for name in (EVAL_IMAGE, ROLLOUT, TEACHER_PROMPTS) for t in tuples}
    # the same tuple in two streams, or a shorter tuple in the same stream, gives another seed
    seeds.update({("short", t[:3]): stream_seed(ROLLOUT, *t[:3]) for t in tuples})
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())
    torch.Generator().manual_seed(max(seeds.values()))  # within what torch takes


def test_bad_stream_names_and_parts_are_refused():
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        stream_seed("a_stream_name_that_is_too_long", 1)
    with pytest.raises(ValueError, match="signed 64-bit"):
        stream_seed(ROLLOUT, 2**63)
