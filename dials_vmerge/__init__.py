"""dials-vmerge: scaling and merging of diffraction data, reading and writing DIALS files."""

__version__ = "0.1.0"
