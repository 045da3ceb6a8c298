"""Helpers shared by the engine tests."""

import copy


def engine_variant(engine, **changes):
    """The same engine (same weights) with other settings: engines keep their settings as plain attributes."""
    variant = copy.copy(engine)
    for name, value in changes.items():
        assert hasattr(variant, name), name
        setattr(variant, name, value)
    return variant
