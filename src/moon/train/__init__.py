"""Training: losses, negative sources and GradCache for MOON's pretraining and post-training."""
