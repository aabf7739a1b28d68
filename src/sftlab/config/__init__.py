"""The run configuration (moved here from sftlab/config.py; the names below are split by module next)."""

from sftlab.config.loading import *  # noqa: F401,F403
from sftlab.config.loading import (  # noqa: F401
    DEMO_CONFIG,
    NO_TRAINING_DATA,
    VERBATIM_KEYS,
    _model_of,
    _set_dotted,
)
from sftlab.config.schema import *  # noqa: F401,F403
