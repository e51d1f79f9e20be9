"""Assets of the batch engine: one results asset per batch, partitioned like its job."""
