"""Triton Python-backend models. ``model_repository/<model>/<version>/model.py`` re-exports these."""
