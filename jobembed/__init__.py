"""jobembed: noisy job-vacancy texts to reliable job-category predictions."""

__version__ = "0.1.0"
