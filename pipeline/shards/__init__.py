"""WebDataset shards: a bounded, atomic writer and a validator of shards against the manifest."""
