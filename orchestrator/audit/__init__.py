"""Power-cap audit: ledgers, GPUs left capped, policy breaches; the ``caps`` and ``doctor`` commands."""
