"""The 2-D ViT branch: data, training (train2d), TPP and SSA stages, the benchmark runner (bench2d)."""
