"""iBOT pretraining: schedules, the training step and loop, and the pretraining stage entry."""
