"""How to run a model: every runtime CLI flag lands in ``RuntimeConfig`` 1:1, converted in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamer.errors import ConfigError
from streamer.experts.policy import DEFAULT_POLICY, POLICIES
from streamer.experts.store import IO_MODES

PREFETCH_MODES = ("off", "parallel", "predict")
PRELOAD_MODES = ("none", "hot", "all")


@dataclass
class RuntimeConfig:
    """How to run a model: expert cache size, I/O, prefetch, threads, compute dtype.

    ``cache_bytes`` (``--cache-gb``) and ``cache_experts`` (``--cache-experts``) are alternatives;
    with neither, ``default_cache_bytes`` derives the budget from the machine's RAM.
    """

    cache_bytes: int | None = None
    cache_experts: int | None = None
    io_mode: str = "buffered"
    prefetch: str = "parallel"
    threads: int = 8
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    io_timeout_s: float = 60.0  # --io-timeout: the longest wait for one expert read
    # --verify-reads: CRC-32 of every expert block read, against the manifest. DECISION: off by default;
    # the bar was <= 5 % of decode time and the streaming case misses it. benchmarks/bench_verify_reads.py
    # (results.tsv, 2 shared x86 cores, page cache warm, zlib.crc32 6-7 GB/s/core), decode on/off:
    # - like-35b bf16 preset (16 KiB blocks), 200 tokens: small cache 1.006, default cache 1.000
    #   (CRC work 2.35 % / 0.09 % of decode time);
    # - full-width (real 397B widths, 7 MB blocks) 1 layer, 12 tokens: small cache 1.228 (71 MB read and
    #   checked per token, CRC work 14 % of decode), default cache 1.285 (still filling: 54 MB/token).
    # At real block sizes the check costs 13-28 % while experts stream, so it is opt-in; `streamer repack`
    # re-checks every byte of a complete copy and `streamer verify` names damage. Revisit with a faster
    # ISO-HDLC CRC (isal, zlib-ng) and on a Mac, where reads come from the SSD, not the page cache.
    verify_reads: bool = False
    cache_policy: str = DEFAULT_POLICY  # --cache-policy: which cached expert a miss evicts
    # --preload: fill the cache before the first token. "hot": the most-routed experts of the model's
    # profile (``profile`` or profile.json in the packed model; `streamer profile` writes it); "all":
    # experts in layer and id order until full; "none": start empty.
    preload: str = "none"
    profile: str | None = None  # --profile: the profile file --preload hot reads
    # Approximate routing, opt-in (models/moe_block.py); the defaults are the model's exact routing.
    experts_per_token: int | None = None  # --experts-per-token: fewer than the model's top-k
    cache_bias: float = 0.0  # --cache-bias: added to cached experts' router logits (streamed models only)

    @property
    def exact_routing(self) -> bool:
        """True unless an approximate-routing flag is set (cache bias 0 and no --experts-per-token)."""
        return self.experts_per_token is None and self.cache_bias == 0

    def __post_init__(self):
        if self.cache_bytes is not None and self.cache_experts is not None:
            raise ConfigError("give --cache-gb or --cache-experts, not both")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ConfigError(f"--cache-gb must be positive, got {self.cache_bytes / 1e9:g}")
        if self.cache_experts is not None and self.cache_experts <= 0:
            raise ConfigError(f"--cache-experts must be positive, got {self.cache_experts}")
        if self.io_mode not in IO_MODES:
            raise ConfigError(f"--io must be one of {', '.join(IO_MODES)}, got {self.io_mode!r}")
        if self.prefetch not in PREFETCH_MODES:
            raise ConfigError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {self.prefetch!r}")
        if self.cache_policy not in POLICIES:
            raise ConfigError(
                f"--cache-policy must be one of {', '.join(POLICIES)}, got {self.cache_policy!r}"
            )
        if self.preload not in PRELOAD_MODES:
            raise ConfigError(f"--preload must be one of {', '.join(PRELOAD_MODES)}, got {self.preload!r}")
        if self.experts_per_token is not None and self.experts_per_token < 1:
            raise ConfigError(
                f"--experts-per-token must be at least 1, got {self.experts_per_token} "
                "(leave it out for the model's own top-k)"
            )
        if not (self.cache_bias >= 0 and math.isfinite(self.cache_bias)):
            raise ConfigError(
                f"--cache-bias must be a finite number >= 0 (a log-probability margin; 0 = exact), "
                f"got {self.cache_bias}"
            )
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if not (self.io_timeout_s > 0 and math.isfinite(self.io_timeout_s)):
            raise ConfigError(f"--io-timeout must be a positive number of seconds, got {self.io_timeout_s}")
