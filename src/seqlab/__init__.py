"""seqlab: train, stream and measure sequence models side by side."""

from seqlab.checkpoint import load, save
from seqlab.config import ModelConfig
from seqlab.convert import convert
from seqlab.errors import InputError
from seqlab.generate import generate, generate_batch
from seqlab.infer.stream import Stream
from seqlab.interop.gguf import from_gguf
from seqlab.interop.hf import from_hf
from seqlab.models import available_mixers, build_model

__version__ = "0.1.0"

__all__ = ["InputError", "ModelConfig", "Stream", "available_mixers", "build_model", "convert", "from_gguf", "from_hf",
           "generate", "generate_batch", "load", "save", "__version__"]
