"""Stored latent arrays: float16 as is, bfloat16 as its uint16 bit pattern (numpy has no bfloat16), named in
KEY.json's `latent_dtype`. Readers turn either back into float32 with `latent_from_storage`."""

from __future__ import annotations

import numpy as np

STORAGE_DTYPES = ("float16", "bfloat16")


def latent_to_storage(latent, dtype: str = "float16") -> np.ndarray:
    """A float tensor or array -> the array written to KEY.latent.npy for `dtype`."""
    import torch

    t = torch.as_tensor(latent)
    if dtype == "float16":
        return t.to(torch.float16).numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"latent dtype {dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")


def latent_from_storage(array: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """A stored latent -> float32; `dtype` is KEY.json's latent_dtype (uint16 arrays are bfloat16 bits)."""
    if dtype == "bfloat16" or array.dtype == np.uint16:
        bits = array.astype(np.uint32) << 16  # bfloat16 is the top half of a float32
        return bits.view(np.float32)
    return array.astype(np.float32)
