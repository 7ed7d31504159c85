"""A prediction run: discover inputs, predict each scan, write outputs, shards, locks, reports."""
