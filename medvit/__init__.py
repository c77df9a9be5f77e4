"""medvit: a Snakemake pipeline for medical image analysis with vision transformers."""

__version__ = "0.1.0"
