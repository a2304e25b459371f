"""labelwise: semantic segmentation when pixel labels are scarce or absent."""

__version__ = "0.1.0"
