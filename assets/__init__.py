"""Assets of the batch engine: the factory of each batch's results asset and job, its metadata."""
