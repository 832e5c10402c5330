"""Lean side: bundle reader, backends, tokenizer, numpy schedulers, sampling pipeline. Never imports torch."""
