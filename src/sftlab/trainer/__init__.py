"""The training recipe: setup, the loop and its phases, optimizer and schedule, precision, checkpoints,
metrics and outputs (`sftlab.train(...)`, the API function in sftlab/api.py, runs it)."""
