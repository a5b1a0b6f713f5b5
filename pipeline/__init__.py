"""MovieLens recommender pipeline: one module per DVC stage plus shared helpers."""
