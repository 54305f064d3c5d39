"""Data layer: sources, decoding, the tf.Example schema, shards, quality, pipeline."""
