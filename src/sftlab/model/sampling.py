"""The sampling settings of `generate`/`chat` (greedy at temperature 0, nucleus top_p), checked before any
model loads. Light on purpose (no torch): the CLI checks them before the heavy imports."""

from __future__ import annotations

from sftlab.config.schema import ConfigError


def check_sampling(
    temperature: float, top_p: float, names: tuple[str, str] = ("--temperature", "--top-p")
) -> None:
    """A ConfigError unless temperature >= 0 (0: greedy) and 0 < top_p <= 1; `names`: how the caller spells them."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(
            f"{names[0]} must be >= 0 (0: greedy), {names[1]} in (0, 1]; got {temperature}, {top_p}"
        )
