"""Building blocks of the decoder models."""
