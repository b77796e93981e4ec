"""caaxr-tf: the CAAXR COVID-19 chest X-ray benchmark in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
