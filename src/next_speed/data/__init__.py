"""Steps 01, 02 and 04: corpus sources, sentence splitting, sentence embeddings, the training sets."""
