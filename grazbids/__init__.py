"""grazbids: relevance-guided (Graz+) deep learning on brain MRI as a BIDS App."""

__version__ = "0.1.0"
