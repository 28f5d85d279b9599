"""Validation of the options every layer takes (editors' hyper-parameters, run options), shared once.

Each check raises :class:`~kelight.types.EditInputError` naming the option, the expected form and
the value given, before any weight is touched. Checks of the requests themselves live with
:class:`~kelight.types.EditRequest`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kelight.types import EditInputError


def check_number(name: str, value: object, positive: bool, allow_inf: bool = False, hint: str = "") -> float:
    """``value`` if it is a number ``> 0`` (``positive``) or ``≥ 0``, finite unless ``allow_inf``.

    Example:
        >>> check_number("lr", 0.5, positive=True)
        0.5
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > 0 if positive else value >= 0) and (allow_inf or math.isfinite(value))  # type: ignore[operator]
    if not ok:
        bound = "> 0" if positive else "≥ 0"
        kind = f"number {bound} (inf allowed)" if allow_inf else f"finite number {bound}"
        raise EditInputError(f"expected {name} to be a {kind}, got {value!r}{hint}")
    return value  # type: ignore[return-value]


def check_count(name: str, value: object, low: int = 1, hint: str = "") -> int:
    """``value`` if it is an integer ``≥ low`` (``True`` and ``"3"`` are not).

    Example:
        >>> check_count("steps", 20)
        20
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise EditInputError(f"expected {name} to be an integer ≥ {low}, got {value!r}{hint}")
    return value


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_layer(name: str, value: object) -> int:
    """``value`` if it is one layer index (an integer ≥ 0; ``True`` and ``"1"`` are not).

    The upper bound depends on the model: :meth:`~kelight.models.adapters.ArchAdapter.check_layer`.

    Example:
        >>> check_layer("layer", 4)
        4
    """
    if not _is_index(value):
        hint = "; this method edits one layer (MEMIT/PMET take layers=[...])" if isinstance(value, list | tuple) else ""
        raise EditInputError(
            f"expected {name} to be one layer index, an integer ≥ 0 (e.g. {name}=4), got {value!r}{hint}"
        )
    return value  # type: ignore[return-value]


def check_layers(name: str, value: object) -> tuple[int, ...]:
    """``value`` as a tuple if it is a non-empty ascending list of distinct layer indices.

    Example:
        >>> check_layers("layers", [2, 3, 4])
        (2, 3, 4)
    """
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(_is_index(x) for x in value):
        hint = f"; one layer is written [{value}]" if _is_index(value) else ""
        raise EditInputError(f"expected {name} to be a list of layer indices, integers ≥ 0 (e.g. {name}=[2, 3, 4]), "
                             f"got {value!r}{hint}")
    if not value or list(value) != sorted(set(value)):
        raise EditInputError(f"expected {name} to be a non-empty ascending list of distinct layers, got {list(value)}")
    return tuple(value)


def _is_pair(pair: object) -> bool:
    return isinstance(pair, list | tuple) and len(pair) == 2 and all(_is_index(x) and x > 0 for x in pair)


def check_context_templates(value: object) -> tuple[tuple[int, int], ...]:
    """``[[length, count], ...]`` (positive integers) as a tuple of ``(length, count)`` pairs.

    ``[]`` is valid: the plain prompt only.

    Example:
        >>> check_context_templates([[5, 10], [10, 10]])
        ((5, 10), (10, 10))
    """
    pairs = value if isinstance(value, list | tuple) else None
    bad = [p for p in pairs if not _is_pair(p)] if pairs is not None else [value]
    if bad:
        got = f"{value!r}" if pairs is None else f"{bad[0]!r} in {value!r}"
        flat = pairs is not None and all(_is_index(x) for x in pairs)
        raise EditInputError(
            f"expected context_templates to be [length, count] pairs of positive integers, e.g. [[5, 10], [10, 10]] "
            f"([] = the plain prompt only), got {got}"
            + ("; write each pair in its own brackets: [[length, count], ...]" if flat else "")
        )
    return tuple((a, b) for a, b in pairs)
