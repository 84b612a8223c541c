"""Step 07: the sentence-step generation loop and the decoding engine that batches it."""
