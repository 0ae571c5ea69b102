"""Pure per-clip scorers over sampled frames: motion, sharpness, exposure, text, CLIP, dedup."""
