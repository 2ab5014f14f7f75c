"""Per-image noise seeds for evaluation.

Every evaluated image is named by three integers: the run's ``seed``, the index of its prompt in
the task's prompt set and its index among that prompt's images (``0 … images_per_prompt − 1``).
:func:`image_seed` mixes the three into the seed of that image's initial noise (passed to
:func:`opd.sampling.generate` as ``seeds=``), so an image is the same whatever the batch size, the
number of ranks sharing the work, or ``images_per_prompt`` (image 0 of a prompt is the same with 1
or 4 images per prompt).

The mixing is BLAKE2b with an 8-byte digest over the three integers packed as little-endian
signed 64-bit values, read back as a little-endian integer and shifted right by one bit: a 63-bit
seed, within what ``torch.Generator.manual_seed`` takes. A cryptographic hash rather than an
affine formula (``seed · P + index``) keeps the seeds of neighbouring triples unrelated and makes
collisions between different triples practically impossible.
"""
from __future__ import annotations

import hashlib
import struct


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The noise seed of image ``image_index`` of prompt ``prompt_index`` under run seed ``seed``
    (see the module docstring for the mixing)."""
    digest = hashlib.blake2b(struct.pack("<3q", seed, prompt_index, image_index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
