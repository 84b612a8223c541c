"""Step 03: residual vector quantization of sentence embeddings, and the code browser."""
