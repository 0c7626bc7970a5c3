"""builder: a compatibility matrix of CUDA, cuDNN, Python and frameworks, turned into certified images."""

__version__ = "0.1.0"
