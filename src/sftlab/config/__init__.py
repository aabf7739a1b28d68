"""sftlab's run configuration: one YAML file (or the Python API's arguments) validated into `SFTConfig`.

The public names, imported from here::

    from sftlab.config import SFTConfig, load_config, ConfigError
    from sftlab.config import ModelConfig, DataConfig, SourceConfig, OptimConfig, TrainConfig
    from sftlab.config import CheckpointConfig, PeftSettings, MatchEvalConfig

The modules, each defining its own names (sftlab's own code imports from them):

- schema.py: the pydantic models, one per YAML section (`SFTConfig` holds them), and `ConfigError`;
- fields.py: the row formats' declarations (ROW_FORMATS, the table of docs/data.md), and the checks of a source's
  `columns` and marker templates;
- aliases.py: other tools' names for sftlab's keys (the did-you-mean, `sftlab convert-config`'s renames);
- overrides.py: dotted overrides of a config tree (`optim.lr=1e-5`);
- keys.py: every dotted key, the did-you-mean for a mistyped one, the message of a validation error;
- loading.py: `load_config` (a YAML file + overrides), `resolve_config` (the Python API), `dump_config`;
- reference.py: `config_reference`, every key's type, default and description (docs/config.md).

The config is the bottom layer: it imports nothing of sftlab's data, model or trainer.
"""

from sftlab.config.loading import load_config
from sftlab.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    MatchEvalConfig,
    ModelConfig,
    OptimConfig,
    PeftSettings,
    SFTConfig,
    SourceConfig,
    TrainConfig,
)

__all__ = [
    "SFTConfig",
    "load_config",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "SourceConfig",
    "OptimConfig",
    "TrainConfig",
    "CheckpointConfig",
    "PeftSettings",
    "MatchEvalConfig",
]
