"""Command settings read from a YAML file into a dataclass (the demo's and ``evidence``'s ``--config``)."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml


def settings_from_yaml(cls, path: Path, section: str, overrides: dict, path_fields: tuple[str, ...],
                       error: type[Exception] = ValueError):
    """Builds the dataclass ``cls`` from a YAML file and ``overrides``.

    Args:
        path: the YAML file; its ``section:`` mapping (or its top level) holds the settings.
        section: the mapping's name, also used in the error message (``demo``, ``evidence``).
        overrides: settings that replace the file's (the caller drops the ones it does not want applied).
        path_fields: settings turned into ``Path`` when given.
        error: the exception raised for a setting ``cls`` does not have.
    Returns:
        ``cls(**settings)``.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    data = data.get(section, data)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{path}: unknown {section} setting(s) {unknown}; valid: {sorted(known)}")
    data.update(overrides)
    for key in path_fields:
        if data.get(key) is not None:
            data[key] = Path(data[key])
    return cls(**data)
