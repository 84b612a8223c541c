"""The planner (Sentence-LM over code tuples), the decoder and its prompt format, tiny stand-in models."""
