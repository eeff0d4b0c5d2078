"""Data room: JSONL records in, packed rows out (reading, validating, masking, packing, preparing).

Reads dataset files through `io.storage` only; knows nothing of models, evaluation or the recipe.
"""
