"""Caption embeddings from a tiny random T5 encoder saved and loaded through AutoModelForTextEncoding."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.text_encoder import CaptionEncoder


@pytest.fixture(scope="module")
def encoder() -> CaptionEncoder:
    return CaptionEncoder("recap-tiny:text_encoder", device="cpu", max_length=16)


def test_one_row_per_real_token_and_batch_independent(encoder):
    captions = ["a cat sits on a mat", "a person walks slowly along a quiet city street at night in the rain"]
    batch = encoder.encode(captions)
    lengths = [len(encoder.tokenizer(c)["input_ids"]) for c in captions]
    assert [e.shape for e in batch] == [(lengths[0], 32), (min(lengths[1], 16), 32)]
    alone = encoder.encode(captions[:1])[0]
    np.testing.assert_allclose(alone, batch[0], atol=1e-5)  # padding in a batch changes nothing
    assert not np.allclose(batch[0][0], batch[1][0])


def test_empty_captions(encoder):
    assert [e.shape for e in encoder.encode(["", ""])] == [(0, 32), (0, 32)]
    assert encoder.encode([]) == []
