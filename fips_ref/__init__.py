"""fips_ref: a reference implementation of FiPS (arXiv 2411.09816) in NumPy / CuPy."""

__version__ = "0.1.0"
