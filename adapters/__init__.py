"""Few-shot domain adaptation of CS-Flow's early extractor blocks, and the domain shifts used to test it."""
