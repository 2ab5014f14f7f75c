"""The mini world: flat shapes and text signs, their renderer, and the three task prompt sets.

See docs/mini_world.md. ``scene`` holds the objects and colours, ``render`` draws them, ``grammar``
writes prompts (GenEval-, OCR- and aesthetic-style), ``layout`` the scenes that satisfy them.
"""

from opd.data.world.grammar import load_prompts, write_prompt_files
from opd.data.world.layout import random_scene, scene_for
from opd.data.world.render import render, render_tensor
from opd.data.world.scene import Scene, Shape, Sign

__all__ = [
    "Scene",
    "Shape",
    "Sign",
    "load_prompts",
    "random_scene",
    "render",
    "render_tensor",
    "scene_for",
    "write_prompt_files",
]
