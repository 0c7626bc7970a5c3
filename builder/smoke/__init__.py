"""The smoke payload shipped in every image (payload.py stands alone; see its docstring)."""
