"""The seeds of opd's named random streams, from one function: :func:`stream_seed`.

A *stream* is one use of randomness, named by a short string; one draw within it is named by a
tuple of integers. The streams:

- :data:`EVAL_IMAGE` ``(seed, prompt_index, image_index)``: an evaluated image's initial noise
  (:func:`opd.evaluation.seeds.image_seed`);
- :data:`ROLLOUT` ``(seed, round, rank, purpose)``: a training rollout's initial and per-step noise
  (:meth:`opd.modules.policy.AdapterPolicy.generator`; ``purpose`` tells the rollouts and noisings
  of one round apart);
- :data:`TEACHER_PROMPTS` ``(seed, round, teacher, rank)``: the prompts DiffusionOPD draws for one
  teacher in one round (:meth:`opd.modules.distill.OPDDistill.draw`);
- :data:`ROUND_GROUPS` ``(seed, round)``: which prompts an online-RL round samples and in which order
  (:func:`opd.data.prompts.round_groups`);
- :data:`GENERATE` ``(seed, prompt_position)``: the initial noise of :func:`opd.sampling.rollout.generate`
  when no per-image seeds are passed (previews, quick looks).

The seed is BLAKE2b with an 8-byte digest over the integers packed as little-endian signed 64-bit
values, with the stream's name as BLAKE2b's personalisation string (``person``, at most 16 bytes),
read back as a little-endian integer and shifted right by one bit: a 63-bit seed, within what
``torch.Generator.manual_seed`` takes (CPU and CUDA generators alike).

Why no two draws share a seed: within a stream, different tuples are different inputs (8 bytes per
integer; tuples of different lengths differ in length), and across streams the personalisation
makes each name a separate hash function. Two draws therefore share a seed only by a 63-bit hash
collision, about ``n² / 2⁶⁴`` for ``n`` seeds in all (5·10⁻⁸ for a million). No part has a range
either, and neighbouring tuples get unrelated seeds. An affine mixing such as
``(seed · 1_000_003 + round) · 1009 + rank`` is injective only while every part stays below the next
factor, and two call sites mixing that way can reach the same value.

:data:`EVAL_IMAGE` is the empty name (BLAKE2b's default personalisation), the mixing evaluation
images have always used, so their noise did not change when the other streams moved here.
"""
from __future__ import annotations

import hashlib
import struct

#: an evaluated image's initial noise: ``(seed, prompt_index, image_index)``
EVAL_IMAGE = ""
#: a training rollout's noise: ``(seed, round, rank, purpose)``
ROLLOUT = "rollout"
#: DiffusionOPD's prompt draw for one teacher: ``(seed, round, teacher, rank)``
TEACHER_PROMPTS = "teacher_prompts"
#: an online-RL round's prompt groups: ``(seed, round)``
ROUND_GROUPS = "round_groups"
#: :func:`opd.sampling.rollout.generate`'s noise without per-image seeds: ``(seed, prompt_position)``
GENERATE = "generate"


def stream_seed(stream: str, *parts: int) -> int:
    """The 63-bit seed of the draw ``parts`` of stream ``stream`` (see the module docstring)."""
    person = stream.encode()
    if len(person) > hashlib.blake2b.PERSON_SIZE:
        raise ValueError(f"stream name {stream!r} is longer than {hashlib.blake2b.PERSON_SIZE} bytes")
    try:
        data = struct.pack(f"<{len(parts)}q", *parts)
    except struct.error as err:
        raise ValueError(f"stream {stream!r}: seed parts must be signed 64-bit integers, got {parts}") from err
    digest = hashlib.blake2b(data, digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little") >> 1
