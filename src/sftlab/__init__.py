"""sftlab: supervised fine-tuning of causal language models.

Entry points: the `sftlab` command (`sftlab.cli`), `sftlab.train.loop.run_training(config)`, and
the data interface `sftlab.data.PackedSFTDataset` / `sftlab.data.iterate_batches`.
"""

__version__ = "0.1.0"
