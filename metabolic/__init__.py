"""metabolic: training that spends a metabolic energy budget on which samples and which weights learn."""

__version__ = "0.1.0"
