"""Recording routing traces: each MoE layer's chosen experts as JSON lines, for ``advise`` and simulation."""

from __future__ import annotations

import json
from pathlib import Path

from streamer.errors import ConfigError


class RouteTrace:
    """Writes every routing decision as a JSON line: {"pos", "layer", "experts": [[K ids] per token]}."""

    def __init__(self, path: Path):
        try:
            self._file = open(path, "w")
        except OSError as e:
            raise ConfigError(f"--trace: cannot write {path} ({e.strerror})") from None
        self._pos = 0  # sequence position of the current step's first token
        self._step_tokens = 0

    def __call__(self, layer: int, ids) -> None:
        if layer == 0:
            self._pos += self._step_tokens
            self._step_tokens = len(ids)
        self._file.write(json.dumps({"pos": self._pos, "layer": layer, "experts": ids.tolist()}) + "\n")

    def close(self) -> None:
        self._file.close()
