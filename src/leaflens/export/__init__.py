"""Export a training run as a self-contained, checksummed model package (``export(cfg)`` in ``run``)."""
