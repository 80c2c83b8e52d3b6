"""xraylib's own exception types.

Every error a user can trigger with bad input is one of these, and its message names the
file (or setting) and says what is wrong and what to do. Bulk work catches
:class:`BadFileError` per file, reports it and carries on.
"""
from __future__ import annotations

import os


class XraylibError(Exception):
    """Base class of every error xraylib raises on purpose."""


class ConfigError(XraylibError):
    """A setting, a YAML file or a path given by the user is missing or wrong."""


class SourceError(XraylibError):
    """A data source folder or its label file cannot be used (missing folder, missing columns)."""


class BadFileError(XraylibError):
    """One input file cannot be read; bulk work reports it and skips the file.

    ``path`` is the file, ``reason`` a short plain-words description of the problem.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelError(XraylibError):
    """A model cannot be built, loaded or used (wrong weights file, missing metadata, ...)."""
