"""egress: the one egress endpoint through which internal apps reach LLM providers."""

__version__ = "0.1.0"
