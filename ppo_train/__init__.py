"""pptrain: preference optimization with prefix sharing and packing."""

__version__ = "0.1.0"
