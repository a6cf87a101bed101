"""raytrain_vae: convolutional VAEs trained with Ray Train, searched with Ray Tune + Optuna."""

__version__ = "0.1.0"
