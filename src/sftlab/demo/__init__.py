"""The embedded demo task: a seeded generator (make_task.py), its data and its config (demo.yaml)."""
