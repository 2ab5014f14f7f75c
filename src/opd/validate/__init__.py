"""Checks of a composed config that run before anything is built (no model, no reward, no data).

``validate_train_config(cfg)`` (top of :func:`opd.train.train`) and ``validate_eval_config(cfg)``
(top of :func:`opd.evaluate.evaluate`) collect *every* bad value they find and raise one
:class:`ConfigError` listing them, each as ``<config key>=<value>: <the allowed range and how to fix
it>``. Typos in the keys of a ``_target_`` node (``module.group_sise``) are caught here too, from the
target's signature, before Hydra instantiates anything. :func:`check_ckpt_path` checks a checkpoint
file (resuming from a truncated ``last.ckpt`` names the file and lists the other checkpoints of
its folder).

The structured-config schemas of :mod:`opd.config` already type-check the sampler, objective and
teacher groups at compose time; the ranges and the cross-group rules live here.
"""
from opd.validate.checks import ConfigError, check_ckpt_path, max_noise_level
from opd.validate.eval import validate_eval_config
from opd.validate.train import validate_train_config

__all__ = ["ConfigError", "check_ckpt_path", "max_noise_level", "validate_eval_config", "validate_train_config"]
