"""Training: configs, data, optimisation, the trainer loop and metrics."""
