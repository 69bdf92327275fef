"""Sample-to-class losses, one per file; each registers itself (``losses.registry``)."""
