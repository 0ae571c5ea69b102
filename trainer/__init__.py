"""Diffusion transformer over spacetime latent patches, trained from recap shards; see issue 6."""
