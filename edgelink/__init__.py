"""edgelink: hand a language model's internal state to another process instead of text."""

__version__ = "0.1.0"
