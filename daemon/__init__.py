"""edgellm's device side, installed as `edgellm.daemon`: load a model folder, generate, retrieve, update, serve.

Its rooms import in one direction: engine <- retrieval <- update <- serve <- cli. It never imports
edgellm.models, torch, transformers or optimum."""

__version__ = "0.1.0"
