"""De-identification recipes in the ``deid`` package's format, compiled for speed.

A recipe file (``FORMAT dicom``, a ``%header`` section, one ``ACTION FIELD [VALUE]``
line per rule) is parsed by ``deid.config.DeidRecipe``, so any file the ``deid``
tools accept is read the same way here. The rules are then compiled once into
matchers, and the decision for each element is cached by its tag, VR and private
creator: a dataset of a few hundred distinct tags costs a few hundred rule scans in
a whole ingest, not one scan per element of every instance.

Field expressions understood (those of deid): a keyword; a tag ``(gggg,eeee)`` or
``ggggeeee`` where ``x`` matches any hex digit; a private tag
``(gggg,"CREATOR",ee)``; ``all``; ``startswith:``, ``endswith:`` and ``contains:``
on the keyword, with ``|`` between alternatives; ``select:VR:XX`` and
``select:group:gggg``. The first matching line decides.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydicom.datadict import tag_for_keyword

from workbench.errors import RecipeError

__all__ = [
    "CLEAN_DESCRIPTORS_RECIPE",
    "DEFAULT_RECIPE",
    "CompiledRecipe",
    "ElementKey",
    "Rule",
    "compile_recipe",
    "load_recipe",
    "recipe_paths",
]

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "basic-profile.dicom"
CLEAN_DESCRIPTORS_RECIPE = "clean-descriptors.dicom"
ACTIONS = frozenset({"KEEP", "REMOVE", "BLANK", "REPLACE", "JITTER", "ADD"})

_TAG_RE = re.compile(r"^\(?([0-9a-fx]{4}),?([0-9a-fx]{4})\)?$", re.IGNORECASE)
_PRIVATE_RE = re.compile(r'^\(([0-9a-f]{4}),"(.+)",([0-9a-f]{2})\)$', re.IGNORECASE)
_VERSION_RE = re.compile(r"^#.*\bversion\s+(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ElementKey:
    """What a rule can match on: tag, VR, keyword and private creator."""

    tag: int
    vr: str
    keyword: str
    private_creator: str | None = None


@dataclass(frozen=True)
class Rule:
    """One recipe line: an action, the field expression it applies to, a value."""

    action: str
    field: str
    value: str | None
    matches: Callable[[ElementKey], bool] = field(compare=False, repr=False)

    @property
    def function(self) -> str | None:
        """The workbench function the value names (``func:NAME``), if any."""
        if self.value and self.value.startswith("func:"):
            return self.value[5:]
        return None


@dataclass
class CompiledRecipe:
    """A recipe ready to apply: ordered element rules, ADD rules, and a cache.

    Attributes
    ----------
    rules
        Rules for elements found in the dataset, in file order.
    additions
        ``ADD`` rules, applied to the top-level dataset after the element rules.
    sources
        ``(file name, SHA-256 of its bytes, version)`` of each recipe file read.
    """

    rules: list[Rule]
    additions: list[Rule]
    sources: list[tuple[str, str, str]]
    _cache: dict[tuple[int, str, str | None], Rule | None] = field(
        default_factory=dict, repr=False
    )

    def rule_for(self, key: ElementKey) -> Rule | None:
        """Return the first rule whose field matches ``key``, or None."""
        cache_key = (key.tag, key.vr, key.private_creator)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        found = next((rule for rule in self.rules if rule.matches(key)), None)
        self._cache[cache_key] = found
        return found

    def kept_private_creators(self) -> set[tuple[int, str]]:
        """Return the ``(group, creator)`` pairs that a KEEP rule names."""
        kept = set()
        for rule in self.rules:
            match = _PRIVATE_RE.match(rule.field)
            if rule.action == "KEEP" and match:
                kept.add((int(match.group(1), 16), match.group(2)))
        return kept

    @property
    def digest(self) -> str:
        """SHA-256 over the recipe files' digests, in the order they were read."""
        joined = "".join(sha for _, sha, _ in self.sources)
        return hashlib.sha256(joined.encode("ascii")).hexdigest()

    def __getstate__(self) -> dict:
        # Matchers are closures; rebuild them from the text on the other side.
        return {"texts": self._texts}

    def __setstate__(self, state: dict) -> None:
        compiled = compile_recipe(state["texts"])
        self.__dict__.update(compiled.__dict__)


def recipe_paths(*, clean_descriptors: bool = False) -> list[Path]:
    """Return the bundled recipe files for the chosen options, first rule first."""
    folder = resources.files("workbench") / "recipes"
    names = [CLEAN_DESCRIPTORS_RECIPE] if clean_descriptors else []
    names.append(DEFAULT_RECIPE)
    return [Path(str(folder / name)) for name in names]


def load_recipe(paths: Sequence[Path | str]) -> CompiledRecipe:
    """Parse and compile recipe files; rules of earlier files take precedence.

    Raises
    ------
    RecipeError
        When a file is missing, is not a deid ``FORMAT dicom`` recipe, or holds a
        line this module cannot apply.
    """
    texts = []
    for name in paths:
        path = Path(name)
        try:
            texts.append((path.name, path.read_bytes()))
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    return compile_recipe(texts)


def compile_recipe(texts: list[tuple[str, bytes]]) -> CompiledRecipe:
    """Compile ``(file name, bytes)`` recipes; earlier files take precedence."""
    rules: list[Rule] = []
    additions: list[Rule] = []
    sources = []
    for name, data in texts:
        text = data.decode("utf-8")
        version_match = _VERSION_RE.search(text)
        version = version_match.group(1) if version_match else ""
        sources.append((name, hashlib.sha256(data).hexdigest(), version))
        for entry in _parse_with_deid(name, text):
            rule = _rule(name, entry)
            (additions if rule.action == "ADD" else rules).append(rule)
    compiled = CompiledRecipe(rules=rules, additions=additions, sources=sources)
    compiled._texts = texts  # type: ignore[attr-defined]
    log.debug(
        "compiled %d element rules and %d additions from %d recipe files",
        len(rules),
        len(additions),
        len(texts),
    )
    return compiled


def _parse_with_deid(name: str, text: str) -> list[dict]:
    """Parse recipe text with deid's own parser, so both read a file the same way."""
    import tempfile

    from deid.config import DeidRecipe
    from deid.logger import bot

    if not re.search(r"^\s*FORMAT\s+dicom\s*$", text, re.MULTILINE | re.IGNORECASE):
        raise RecipeError(
            f"recipe {name} has no 'FORMAT dicom' line; a recipe starts with the lines"
            " 'FORMAT dicom' and '%header', then one action a line"
        )
    _check_lines(name, text)
    # deid prints every parsed line at its default level; quiet it while parsing.
    previous_level = bot.level
    bot.level = 0
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".dicom", delete=True) as handle:
            handle.write(text)
            handle.flush()
            recipe = DeidRecipe(deid=handle.name, base=False)
            entries = recipe.get_actions() or []
    except SystemExit as exc:  # deid's parser exits on malformed lines
        raise RecipeError(f"deid could not parse recipe {name}") from exc
    finally:
        bot.level = previous_level
    return list(entries)


def _check_lines(name: str, text: str) -> None:
    """Reject lines of the header section that are no action deid would apply.

    deid's parser skips such lines without a word, so a typo would silently drop
    a rule.
    """
    section = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.upper().startswith("FORMAT"):
            continue
        if line.startswith("%"):
            section = line[1:].split()[0].lower()
            continue
        if section != "header":
            continue
        action = line.split()[0].upper()
        if action not in ACTIONS:
            raise RecipeError(
                f"recipe {name}, line {number}: {action!r} is not an action; use one"
                f" of {', '.join(sorted(ACTIONS))}"
            )


def _rule(name: str, entry: dict) -> Rule:
    action = str(entry.get("action", "")).upper()
    field_expression = str(entry.get("field", "")).strip()
    value = entry.get("value")
    value = str(value).strip() if value is not None else None
    if action not in ACTIONS:
        raise RecipeError(
            f"recipe {name}: action {action!r} is not supported; use one of"
            f" {', '.join(sorted(ACTIONS))}"
        )
    if action in ("REPLACE", "JITTER", "ADD") and not value:
        raise RecipeError(f"recipe {name}: {action} {field_expression} needs a value")
    if value and value.startswith("var:"):
        raise RecipeError(
            f"recipe {name}: {action} {field_expression} uses {value}; deid variables"
            " are not supported, use a workbench func: instead"
        )
    return Rule(
        action=action,
        field=field_expression,
        value=value,
        matches=_matcher(name, field_expression),
    )


def _matcher(name: str, expression: str) -> Callable[[ElementKey], bool]:
    """Compile one field expression into a predicate on :class:`ElementKey`."""
    lowered = expression.lower()
    if lowered == "all":
        return lambda key: True

    private = _PRIVATE_RE.match(expression)
    if private:
        group = int(private.group(1), 16)
        creator = private.group(2)
        offset = int(private.group(3), 16)
        return lambda key: (
            key.private_creator == creator
            and key.tag >> 16 == group
            and key.tag & 0xFF == offset
        )

    tag_match = _TAG_RE.match(expression)
    if tag_match and not expression.isalpha():
        pattern = tag_match.group(1) + tag_match.group(2)
        mask = int("".join("0" if c in "xX" else "F" for c in pattern), 16)
        wanted = int(pattern.replace("x", "0").replace("X", "0"), 16)
        return lambda key: key.private_creator is None and key.tag & mask == wanted

    expander, _, argument = expression.partition(":")
    expander = expander.lower()
    if argument and expander in ("startswith", "endswith", "contains"):
        alternatives = "|".join(re.escape(part) for part in argument.split("|"))
        regex = {
            "startswith": f"^(?:{alternatives})",
            "endswith": f"(?:{alternatives})$",
            "contains": f"(?:{alternatives})",
        }[expander]
        compiled = re.compile(regex, re.IGNORECASE)
        return lambda key: bool(key.keyword) and bool(compiled.search(key.keyword))
    if argument and expander == "select":
        attribute, _, wanted = argument.partition(":")
        if attribute.upper() == "VR":
            vr = wanted[:2].upper()
            return lambda key: key.vr[:2] == vr
        if attribute.lower() == "group":
            group = int(wanted, 16)
            return lambda key: key.tag >> 16 == group
        raise RecipeError(f"recipe {name}: select:{attribute} is not supported")
    if argument:
        raise RecipeError(
            f"recipe {name}: field expander {expander!r} is not supported; use"
            " startswith:, endswith:, contains: or select:VR:"
        )

    tag = tag_for_keyword(expression)
    if tag is None:
        raise RecipeError(
            f"recipe {name}: {expression!r} is neither a DICOM keyword nor a tag"
        )
    return lambda key: key.private_creator is None and key.tag == tag
