"""De-identification of DICOM instances in memory (DICOM PS3.15 Annex E).

Build one :class:`Deidentifier` per ingest and call :func:`deidentify_instance` for
each instance: it collects the source's identifying values, applies the recipe,
and verifies that none of those values survived.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from workbench.deidentify.engine import (
    DeidentificationOptions,
    Deidentifier,
    InstanceContext,
    burned_in_reason,
)
from workbench.deidentify.pseudonyms import Pseudonymizer
from workbench.deidentify.recipe import CompiledRecipe, load_recipe, recipe_paths
from workbench.deidentify.verify import (
    SourceIdentifiers,
    collect_identifiers,
    find_leaks_in_values,
    verify,
)

__all__ = [
    "CompiledRecipe",
    "DeidentificationOptions",
    "Deidentifier",
    "InstanceContext",
    "Pseudonymizer",
    "SourceIdentifiers",
    "build_deidentifier",
    "burned_in_reason",
    "collect_identifiers",
    "deidentify_instance",
    "find_leaks_in_values",
    "load_recipe",
    "recipe_paths",
    "verify",
]


def build_deidentifier(
    key: bytes,
    options: DeidentificationOptions | None = None,
    recipe: CompiledRecipe | None = None,
) -> Deidentifier:
    """Return a :class:`Deidentifier` for the bundled recipe and the given options."""
    options = options or DeidentificationOptions()
    if recipe is None:
        recipe = load_recipe(recipe_paths(clean_descriptors=options.clean_descriptors))
    return Deidentifier(
        recipe=recipe, pseudonymizer=Pseudonymizer(key), options=options
    )


def deidentify_instance(ds: Dataset, deidentifier: Deidentifier) -> SourceIdentifiers:
    """De-identify ``ds`` in place and verify the result.

    Returns the source's identifying values, for checks of what is written next.

    Raises
    ------
    workbench.errors.VerificationError
        When an identifying value of the source survived.
    """
    identifiers = collect_identifiers(ds, deidentifier)
    context = deidentifier.context_for(ds, identifiers)
    deidentifier.deidentify(ds, context)
    verify(ds, identifiers, skip_tags=deidentifier.added_tags)
    return identifiers
