"""CIFAR-10 training pipeline: the pure library behind the DVC stages in stages/."""
