"""Harvard-FairVLMed data: the on-disk reader, the synthetic generator and collation."""
