"""Per-image noise seeds for evaluation.

Every evaluated image is named by three integers: the run's ``seed``, the index of its prompt in
the task's prompt set and its index among that prompt's images (``0 … images_per_prompt − 1``).
:func:`image_seed` mixes the three into the seed of that image's initial noise (passed to
:func:`opd.sampling.generate` as ``seeds=``), so an image is the same whatever the batch size, the
number of ranks sharing the work, or ``images_per_prompt`` (image 0 of a prompt is the same with 1
or 4 images per prompt).

The mixing is :func:`opd.utils.seeds.stream_seed` on the stream
:data:`~opd.utils.seeds.EVAL_IMAGE` (BLAKE2b of the three integers: a 63-bit seed; that module's
docstring says why the seeds of different images, and of other streams, do not collide).
"""
from __future__ import annotations

from opd.utils.seeds import EVAL_IMAGE, stream_seed


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The noise seed of image ``image_index`` of prompt ``prompt_index`` under run seed ``seed``
    (see the module docstring for the mixing)."""
    return stream_seed(EVAL_IMAGE, seed, prompt_index, image_index)
