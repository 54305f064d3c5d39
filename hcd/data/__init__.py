"""Data layer: sources, decoding, the tf.Example schema, shards, quality, batches, pipeline."""

# How a training subset is balanced (hcd.data.pipeline); the choices of
# hcd_train --balance.
BALANCE_MODES = ("undersample", "none", "reweight")
