"""kvarn: calibrated KVarN KV-cache quantization for transformers and vLLM."""

__version__ = "0.1.0"
