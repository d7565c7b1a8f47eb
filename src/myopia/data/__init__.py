"""Text data for language modelling: corpora, tokenizers and memory-mapped token caches."""
