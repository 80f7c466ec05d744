"""fairvlm-hf: robust and fair CLIP fine-tuning for medical image-text data."""

__version__ = "0.1.0"
