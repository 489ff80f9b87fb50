"""Training: the staged schedule, the run's set-up, the epoch loop, optimizers, devices, torchrun, stopping."""
