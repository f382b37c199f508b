"""Apply a compiled recipe to one DICOM instance, in memory.

:class:`Deidentifier` is built once per ingest (recipe, key, options) and applied to
each instance: every element, at every depth, gets the action of the first recipe
line that matches it; private elements go unless a KEEP line names them; the
``ADD`` lines then record what was done. The file meta header is rebuilt from the
de-identified dataset, so MediaStorageSOPInstanceUID always equals the new
SOPInstanceUID.

The instance is changed in place; parse it from bytes again to get the source back.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from workbench import __version__
from workbench.deidentify.pseudonyms import (
    Pseudonymizer,
    patient_key,
    shift_date,
    shift_datetime,
)
from workbench.deidentify.recipe import CompiledRecipe, ElementKey, Rule
from workbench.deidentify.verify import (
    SourceIdentifiers,
    _dictionary_vr,
    _private_creators,
)
from workbench.errors import RecipeError

__all__ = [
    "OPTION_CODES",
    "DeidentificationOptions",
    "Deidentifier",
    "InstanceContext",
    "burned_in_reason",
]

log = logging.getLogger(__name__)

# PS3.16 CID 7050 "De-identification Method", coding scheme DCM.
OPTION_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "safe_private": ("113111", "Retain Safe Private Option"),
}
# Modalities that often carry burned-in text: ultrasound, secondary capture, other,
# external-camera photography.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC"})
MAX_AGE_YEARS = 89
CAPPED_AGE = "090Y"
REMOVED_TEXT = "[removed]"
# Maximum value length in characters by VR (PS3.5 table 6.2-1).
MAX_TEXT_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
_DATE_LIKE = re.compile(
    r"(?<!\d)(\d{4}[-/.]?\d{2}[-/.]?\d{2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})(?!\d)"
)


@dataclass(frozen=True)
class DeidentificationOptions:
    """Choices beyond the recipe that change what an ingest writes.

    Attributes
    ----------
    clean_descriptors
        Keep descriptions and comments with identifying values removed (Clean
        Descriptors Option) instead of removing them.
    quarantine_burned_in
        Quarantine instances that may show burned-in text.
    """

    clean_descriptors: bool = False
    quarantine_burned_in: bool = True


@dataclass
class InstanceContext:
    """What the recipe's functions need to know about the source instance."""

    pseudonym: str
    shift_days: int
    identifiers: SourceIdentifiers
    source_age: str = ""
    birth_date: str = ""
    study_date: str = ""


@dataclass
class Deidentifier:
    """Apply one recipe, with one key and one set of options, to instances.

    Parameters
    ----------
    recipe
        The compiled recipe (see :func:`workbench.deidentify.recipe.load_recipe`).
    pseudonymizer
        Keyed source of new UIDs, pseudonyms and date shifts.
    options
        Options that change the output.
    """

    recipe: CompiledRecipe
    pseudonymizer: Pseudonymizer
    options: DeidentificationOptions = field(default_factory=DeidentificationOptions)

    def __post_init__(self) -> None:
        self._kept_creators = self.recipe.kept_private_creators()
        self._functions: dict[str, Callable[[DataElement, InstanceContext], Any]] = {
            "uid": self._uid,
            "patient_pseudonym": lambda element, ctx: ctx.pseudonym,
            "shift_date": self._shift_date,
            "cap_age": lambda element, ctx: cap_age(str(element.value or "")),
            "clean_text": self._clean_text,
            "deidentification_method": self._method_text,
            "deidentification_method_codes": self._method_codes,
            "age_at_study": self._age_at_study,
        }
        for rule in [*self.recipe.rules, *self.recipe.additions]:
            name = rule.function
            if name is not None and name not in self._functions:
                raise RecipeError(
                    f"recipe line {rule.action} {rule.field} names func:{name};"
                    f" known functions: {', '.join(sorted(self._functions))}"
                )

    # Public API

    def context_for(
        self, ds: Dataset, identifiers: SourceIdentifiers
    ) -> InstanceContext:
        """Return the per-instance context of the source ``ds``."""
        key = patient_key(
            str(ds.get("PatientID", "") or ""),
            str(ds.get("PatientName", "") or ""),
            str(ds.get("PatientBirthDate", "") or ""),
        )
        study_date = next(
            (
                str(ds.get(keyword))
                for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate")
                if ds.get(keyword)
            ),
            "",
        )
        return InstanceContext(
            pseudonym=self.pseudonymizer.patient_pseudonym(key),
            shift_days=self.pseudonymizer.date_shift_days(key),
            identifiers=identifiers,
            source_age=str(ds.get("PatientAge", "") or ""),
            birth_date=str(ds.get("PatientBirthDate", "") or ""),
            study_date=study_date,
        )

    def keeps(self, tag: int, vr: str, private_creator: str | None) -> bool:
        """Return True when the recipe keeps this element, at any depth, unchanged."""
        group, element_number = tag >> 16, tag & 0xFFFF
        if element_number == 0:
            return False
        if group & 1:
            if element_number <= 0x00FF or private_creator is None:
                return False
            key = ElementKey(
                tag=tag, vr=vr, keyword="", private_creator=private_creator
            )
            rule = self.recipe.rule_for(key)
            return rule is not None and rule.action == "KEEP"
        rule = self.recipe.rule_for(_public_key(tag, vr))
        return rule is None or rule.action == "KEEP"

    @property
    def added_tags(self) -> frozenset[int]:
        """Tags the recipe's ADD lines write."""
        tags = (tag_for_keyword(rule.field) for rule in self.recipe.additions)
        return frozenset(tag for tag in tags if tag is not None)

    @property
    def added_keywords(self) -> frozenset[str]:
        """Keywords the recipe's ADD lines write."""
        return frozenset(rule.field for rule in self.recipe.additions)

    def deidentify(self, ds: Dataset, context: InstanceContext) -> None:
        """De-identify ``ds`` in place.

        Raises
        ------
        RecipeError
            When an ADD line names an attribute that is not a DICOM keyword.
        """
        self._clean(ds, context)
        for rule in self.recipe.additions:
            self._add(ds, rule, context)
        self._rebuild_file_meta(ds)

    def method_codes(self) -> list[tuple[str, str]]:
        """Return the (code value, meaning) of the profile and each option applied."""
        chosen = ["basic", "modified_dates", "patient_characteristics"]
        if self.options.clean_descriptors:
            chosen.append("clean_descriptors")
        if self._kept_creators:
            chosen.append("safe_private")
        return [OPTION_CODES[name] for name in chosen]

    # Element rules

    def _clean(self, ds: Dataset, context: InstanceContext) -> None:
        creators = _private_creators(ds)
        for tag in list(ds.keys()):
            group, element_number = tag >> 16, tag & 0xFFFF
            if element_number == 0:
                # Group lengths would be wrong after any change.
                del ds[tag]
                continue
            if group & 1:
                self._clean_private(ds, tag, creators, context)
                continue
            raw = ds.get_item(tag)
            vr = raw.VR or _dictionary_vr(tag)
            rule = self.recipe.rule_for(_public_key(tag, vr))
            if rule is None or rule.action == "KEEP":
                if vr == "SQ":
                    self._clean_items(ds[tag], context)
                continue
            self._apply(ds, tag, rule, context)

    def _clean_items(self, element: DataElement, context: InstanceContext) -> None:
        for item in element.value or ():
            self._clean(item, context)

    def _clean_private(
        self,
        ds: Dataset,
        tag: int,
        creators: dict[tuple[int, int], str],
        context: InstanceContext,
    ) -> None:
        group, element_number = tag >> 16, tag & 0xFFFF
        if element_number < 0x0010:
            del ds[tag]
            return
        if element_number <= 0x00FF:
            creator = creators.get((group, element_number), "")
            if (group, creator) not in self._kept_creators:
                del ds[tag]
            return
        creator = creators.get((group, element_number >> 8))
        if creator is None:
            del ds[tag]
            return
        raw = ds.get_item(tag)
        key = ElementKey(
            tag=tag, vr=raw.VR or "UN", keyword="", private_creator=creator
        )
        rule = self.recipe.rule_for(key)
        if rule is None or rule.action != "KEEP":
            del ds[tag]
        elif ds[tag].VR == "SQ":
            self._clean_items(ds[tag], context)

    def _apply(
        self, ds: Dataset, tag: int, rule: Rule, context: InstanceContext
    ) -> None:
        if rule.action == "REMOVE":
            del ds[tag]
            return
        element = ds[tag]
        if rule.action == "BLANK":
            element.value = element.empty_value
            return
        # REPLACE and JITTER
        if rule.function is not None:
            value = self._functions[rule.function](element, context)
        elif rule.action == "JITTER":
            value = self._jitter(element, rule)
        else:
            value = rule.value
        if value is None:
            del ds[tag]
        else:
            element.value = value

    def _add(self, ds: Dataset, rule: Rule, context: InstanceContext) -> None:
        tag = tag_for_keyword(rule.field)
        if tag is None:
            raise RecipeError(f"ADD {rule.field}: not a DICOM keyword")
        vr = _dictionary_vr(tag)
        if rule.function is not None:
            value = self._functions[rule.function](DataElement(tag, vr, None), context)
        else:
            value = rule.value
        if value is not None:
            ds[tag] = DataElement(tag, vr, value)

    # Recipe functions

    def _uid(self, element: DataElement, context: InstanceContext) -> Any:
        if element.VR != "UI":
            return None
        value = element.value
        if isinstance(value, (MultiValue, list)):
            return [self.pseudonymizer.uid(str(uid)) for uid in value]
        return self.pseudonymizer.uid(str(value)) if value else value

    def _shift_date(self, element: DataElement, context: InstanceContext) -> Any:
        shift = {"DA": shift_date, "DT": shift_datetime}.get(element.VR)
        if shift is None:
            return None
        values = element.value
        if not values:
            return values
        many = isinstance(values, (MultiValue, list))
        shifted = [
            shift(str(v), context.shift_days) for v in (values if many else [values])
        ]
        if any(value is None for value in shifted):
            # A partial or malformed date cannot be shifted by whole days.
            return element.empty_value
        return shifted if many else shifted[0]

    def _jitter(self, element: DataElement, rule: Rule) -> Any:
        try:
            days = int(str(rule.value))
        except ValueError as exc:
            raise RecipeError(
                f"JITTER {rule.field} {rule.value}: the value must be whole days or"
                " func:shift_date"
            ) from exc
        shift = {"DA": shift_date, "DT": shift_datetime}.get(element.VR)
        if shift is None or not element.value:
            return element.value if shift else None
        return shift(str(element.value), days) or element.empty_value

    def _clean_text(self, element: DataElement, context: InstanceContext) -> Any:
        values = element.value
        if not values:
            return values
        many = isinstance(values, (MultiValue, list))
        # The replacement marker can make a value longer than its VR allows.
        limit = MAX_TEXT_LENGTH.get(element.VR)
        cleaned = [
            clean_text(str(value), context.identifiers)[:limit]
            for value in (values if many else [values])
        ]
        return cleaned if many else cleaned[0]

    def _method_text(self, element: DataElement, context: InstanceContext) -> list[str]:
        return list(self._method_texts)

    @cached_property
    def _method_texts(self) -> tuple[str, ...]:
        recipe_text = " + ".join(
            f"{name} {version}".strip() for name, _, version in self.recipe.sources
        )
        texts = [f"workbench {__version__}", f"recipe {recipe_text}"]
        texts.extend(meaning for _, meaning in self.method_codes())
        # DeidentificationMethod is LO: at most 64 characters a value.
        return tuple(text[:64] for text in texts)

    def _method_codes(self, element: DataElement, context: InstanceContext) -> Sequence:
        items = []
        for code, meaning in self.method_codes():
            item = Dataset()
            item.add_new(0x00080100, "SH", code)
            item.add_new(0x00080102, "SH", "DCM")
            item.add_new(0x00080104, "LO", meaning[:64])
            items.append(item)
        return Sequence(items)

    def _age_at_study(
        self, element: DataElement, context: InstanceContext
    ) -> str | None:
        if context.source_age:
            return cap_age(context.source_age)
        return age_between(context.birth_date, context.study_date)

    @staticmethod
    def _rebuild_file_meta(ds: Dataset) -> None:
        old = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta = FileMetaDataset()
        if "TransferSyntaxUID" in old:
            meta.TransferSyntaxUID = old.TransferSyntaxUID
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta


def burned_in_reason(ds: Dataset) -> str | None:
    """Return why ``ds`` may show burned-in text, or None.

    An instance may when it says so (BurnedInAnnotation YES), or when its modality
    often carries text in the pixels (US, SC, OT, XC) and it does not say NO.
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES and flag != "NO":
        return (
            f"modality {modality} may carry burned-in text and BurnedInAnnotation"
            " is not NO"
        )
    return None


def cap_age(value: str) -> str | None:
    """Return a PatientAge with ages over 89 years given as ``090Y``.

    Returns None for a value that is not a valid Age String (``nnnD``, ``nnnW``,
    ``nnnM`` or ``nnnY``), so the attribute is removed rather than kept unchecked.
    """
    value = value.strip()
    if not value:
        return value
    if len(value) != 4 or not value[:3].isdigit() or value[3] not in "DWMY":
        return None
    number = int(value[:3])
    years = {
        "D": number / 365.25,
        "W": number * 7 / 365.25,
        "M": number / 12,
        "Y": number,
    }
    return CAPPED_AGE if years[value[3]] > MAX_AGE_YEARS else value


def age_between(birth_date: str, on_date: str) -> str | None:
    """Return the Age String of someone born on ``birth_date`` at ``on_date``."""
    try:
        born = dt.datetime.strptime(birth_date.strip(), "%Y%m%d").date()
        day = dt.datetime.strptime(on_date.strip(), "%Y%m%d").date()
    except ValueError:
        return None
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    if years < 0:
        return None
    if years > MAX_AGE_YEARS:
        return CAPPED_AGE
    if years >= 2:
        return f"{years:03d}Y"
    months = (day.year - born.year) * 12 + day.month - born.month - (day.day < born.day)
    return f"{max(months, 0):03d}M"


def clean_text(text: str, identifiers: SourceIdentifiers) -> str:
    """Return ``text`` with every source identifier and date-like text removed."""
    pattern = identifiers.pattern()
    if pattern is not None:
        text = pattern.sub(REMOVED_TEXT, text)
    return _DATE_LIKE.sub(REMOVED_TEXT, text)


@lru_cache(maxsize=8192)
def _public_key(tag: int, vr: str) -> ElementKey:
    return ElementKey(tag=tag, vr=vr, keyword=keyword_for_tag(tag) or "")
