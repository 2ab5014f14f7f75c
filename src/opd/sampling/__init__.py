"""Schedules, pure transition kernels and rollouts (docs/method.md)."""
from opd.sampling.kernels import KERNELS, History, Transition, transition
from opd.sampling.rollout import Trajectory, generate, guided_velocity, rollout
from opd.sampling.schedules import sd3_sigmas, shift_sigma, timestep_of

__all__ = [
           "KERNELS",
           "History",
           "Trajectory",
           "Transition",
           "generate",
           "guided_velocity",
           "rollout",
           "sd3_sigmas",
           "shift_sigma",
           "timestep_of",
           "transition",
]
