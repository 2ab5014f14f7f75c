"""Networks and loading only: the backbone interface, SD3.5 via diffusers, the mini model, LoRA."""
from opd.models.backbone import Backbone, PromptEmbeds

__all__ = ["Backbone", "PromptEmbeds"]
