"""seqlab: train, stream and measure sequence models side by side."""

from seqlab.checkpoint import load, save
from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.generate import generate
from seqlab.models import available_mixers, build_model

__version__ = "0.1.0"

__all__ = ["InputError", "ModelConfig", "available_mixers", "build_model", "generate", "load", "save",
           "__version__"]
