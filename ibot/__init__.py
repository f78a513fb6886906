"""iBOT reproduction: pretraining package (models, objective, data, training, launcher)."""

__version__ = "0.1.0"
