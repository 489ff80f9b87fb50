"""Datasets and splits (CIFAR-10, image folders, synthetic) and the loaders that feed them."""
