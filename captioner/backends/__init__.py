"""Captioning backends behind one interface: transformers (CPU or GPU) and vLLM (GPU clusters)."""
