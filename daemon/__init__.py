"""edgellm's device side: load a model folder, generate, serve. Never imports torch or models/."""

__version__ = "0.1.0"
