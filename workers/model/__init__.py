"""LLaMA on FairScale model-parallel layers: shapes, building and loading, generation."""
from .args import PRESETS, ModelArgs
from .checkpoint import build_model, load_checkpoint, resolve_args, save_checkpoint
from .generate import Generator, forward_full
from .transformer import Transformer

__all__ = ["PRESETS", "ModelArgs", "Transformer", "build_model", "load_checkpoint", "resolve_args", "save_checkpoint",
           "Generator", "forward_full"]
