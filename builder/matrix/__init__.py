"""The compatibility matrix: load and validate `matrix.yaml`, then expand it into cells."""

from builder.matrix.expand import Rejection, expand, no_match
from builder.matrix.load import load_matrix
from builder.matrix.model import Base, Cell, Matrix, Selection

__all__ = ["Base", "Cell", "Matrix", "Rejection", "Selection", "expand", "load_matrix", "no_match"]
