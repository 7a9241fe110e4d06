"""Training a Vision Mamba on CIFAR: config, data, augmentation, loop, checkpoints, logs."""
