"""Job launching: one submitit launcher reused by pretraining and every evaluation stage."""
