"""Sample-to-sample losses against the memory bank, one per file; each registers itself
(``losses.registry``)."""
