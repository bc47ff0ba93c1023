"""Formats: one module per on-disk format (detect, save, load), plus the generic save/load."""
from polyquant.formats.base import FORMATS, CheckpointError, Format, get_format, list_formats, register_format

__all__ = ["FORMATS", "CheckpointError", "Format", "get_format", "list_formats", "register_format"]
