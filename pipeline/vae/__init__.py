"""VAE backends that turn frames into latents and back."""
