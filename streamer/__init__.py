"""streamer: run mixture-of-experts models larger than memory by streaming experts from the SSD."""

__version__ = "0.1.0"
