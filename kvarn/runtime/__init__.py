"""Runtimes that serve a recipe: transformers (``KVarNCache``) and vLLM (plugin)."""
