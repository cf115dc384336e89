"""Evaluation: downstream tasks (GLUE, tables, rotten tomatoes) and fine-tuning or probing an encoder on them."""
