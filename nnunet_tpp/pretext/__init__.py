"""Self-supervised pretext objectives used for target parameter pre-training (TPP)."""
