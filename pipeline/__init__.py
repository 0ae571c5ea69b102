"""recap data pipeline: ingest, split, filter, caption, encode, shard."""
