"""tunelite: native-PyTorch fine-tuning recipes for Llama models."""

__version__ = "0.1.0"
