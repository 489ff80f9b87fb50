"""Augmentation: the recipe per image (torchvision v2), the same ops batched on the device, MixUp/CutMix."""
