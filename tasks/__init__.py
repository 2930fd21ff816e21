"""Tasks: a dataset generator and its checker (the bundled IFEval-lite task)."""
