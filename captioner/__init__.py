"""Descriptive re-captioning of clips (transformers and vLLM backends); see issue 4."""
