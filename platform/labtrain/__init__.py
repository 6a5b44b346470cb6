"""labtrain: the training platform of a computer-vision lab that shares one GPU cluster, on Ray."""

__version__ = "0.1.0"
