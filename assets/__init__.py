"""Assets of the batch engine: the factory that turns a batch into its graph-backed results asset and job, and the results metadata."""
