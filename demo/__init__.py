"""The bundled demo model: synthetic shapes dataset, prompt-fidelity evaluator, two-stage training."""
