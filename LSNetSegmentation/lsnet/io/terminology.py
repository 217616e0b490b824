"""Standard names, colours and terminology codes of segmented structures (3D Slicer / DICOM).

3D Slicer stores a segment's terminology as one string (``vtkSlicerTerminologiesModuleLogic::
SerializeTerminologyEntry``; the ``TerminologyEntry`` tag of a ``.seg.nrrd`` segment): seven fields joined
by ``~`` -- context name, category, type, type modifier, anatomic context name, anatomic region, anatomic
region modifier -- where each coded field is a ``scheme^value^meaning`` triplet (``^^`` when empty)::

    Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure
    ~SCT^15776009^Pancreas~^^~Anatomic codes - DICOM master list~^^~^^

Known structures are a data table (:data:`KNOWN_STRUCTURES`, keyed by SNOMED CT code): add a row to
support another organ.  Colours are the ``recommendedDisplayRGBValue`` of Slicer's General Anatomy list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """A coded concept: ``(coding scheme designator, code value, code meaning)``."""

    scheme: str
    value: str
    meaning: str

    def serialize(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> Optional["Code"]:
        parts = text.split("^")
        if len(parts) != 3:
            raise ValueError(f"a coded entry needs 3 '^'-separated parts, got {text!r}")
        return None if not any(parts) else cls(*parts)

    def as_list(self) -> list:
        return [self.scheme, self.value, self.meaning]


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class TerminologyEntry:
    """One Slicer terminology entry (category/type from a segmentation context, optional region)."""

    category: Code
    type: Code
    context_name: str = GENERAL_ANATOMY_CONTEXT
    type_modifier: Optional[Code] = None
    anatomic_context_name: str = ANATOMIC_CONTEXT
    region: Optional[Code] = None
    region_modifier: Optional[Code] = None

    def serialize(self) -> str:
        """The ``~``/``^`` string Slicer stores in the ``TerminologyEntry`` segment tag."""

        def code(c: Optional[Code]) -> str:
            return c.serialize() if c else "^^"

        return "~".join(
            [
                self.context_name,
                code(self.category),
                code(self.type),
                code(self.type_modifier),
                self.anatomic_context_name,
                code(self.region),
                code(self.region_modifier),
            ]
        )

    @classmethod
    def parse(cls, text: str) -> "TerminologyEntry":
        """Inverse of :meth:`serialize`; raises ``ValueError`` on a malformed string."""
        parts = text.split("~")
        if len(parts) != 7:
            raise ValueError(f"a terminology entry needs 7 '~'-separated fields, got {len(parts)}: {text!r}")
        category, type_ = Code.parse(parts[1]), Code.parse(parts[2])
        if category is None or type_ is None:
            raise ValueError(f"terminology entry without category or type: {text!r}")
        return cls(
            category=category,
            type=type_,
            context_name=parts[0],
            type_modifier=Code.parse(parts[3]),
            anatomic_context_name=parts[4],
            region=Code.parse(parts[5]),
            region_modifier=Code.parse(parts[6]),
        )

    def to_slicerio(self) -> dict:
        """The ``terminology`` dict of a ``slicerio`` segment."""
        d: dict[str, Any] = {
            "contextName": self.context_name,
            "category": self.category.as_list(),
            "type": self.type.as_list(),
        }
        if self.type_modifier:
            d["typeModifier"] = self.type_modifier.as_list()
        if self.anatomic_context_name:
            d["anatomicContextName"] = self.anatomic_context_name
        if self.region:
            d["anatomicRegion"] = self.region.as_list()
            if self.region_modifier:
                d["anatomicRegionModifier"] = self.region_modifier.as_list()
        return d


@dataclass(frozen=True)
class Structure:
    """A segmentable structure: display name, terminology and recommended colour (RGB 0-255)."""

    name: str
    terminology: Optional[TerminologyEntry]
    rgb: tuple

    @property
    def color(self) -> tuple:
        """Colour as floats in [0, 1] (what ``.seg.nrrd`` and markups store)."""
        return tuple(c / 255.0 for c in self.rgb)


def _anatomy(code_value: str, meaning: str, rgb: tuple) -> Structure:
    return Structure(meaning, TerminologyEntry(ANATOMICAL_STRUCTURE, Code("SCT", code_value, meaning)), rgb)


KNOWN_STRUCTURES: dict = {
    # SNOMED CT code -> structure (Slicer General Anatomy list, category Anatomical Structure)
    "15776009": _anatomy("15776009", "Pancreas", (249, 180, 111)),
    "78961009": _anatomy("78961009", "Spleen", (157, 108, 162)),
}

# Colours for labels without a known structure (distinct, readable on CT).
_FALLBACK_RGB = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79)]


def lookup_structure(snomed: Optional[str] = None, name: Optional[str] = None) -> Optional[Structure]:
    """Known structure by SNOMED CT code, else by (case-insensitive) name; None when unknown."""
    if snomed and str(snomed) in KNOWN_STRUCTURES:
        return KNOWN_STRUCTURES[str(snomed)]
    if name:
        for s in KNOWN_STRUCTURES.values():
            if s.name.lower() == str(name).strip().lower():
                return s
    return None


def structure_for_label(label: dict) -> Structure:
    """Structure for one model-card label ``{"value": 1, "name": "Pancreas", "snomed": "15776009"}``.

    Known codes/names get the standard name, colour and terminology; an unknown label keeps its name,
    gets a fallback colour and, when it has a SNOMED code, an Anatomical Structure terminology entry.
    """
    value = int(label.get("value", 1))
    known = lookup_structure(label.get("snomed"), label.get("name"))
    if known is not None:
        return known
    name = str(label.get("name") or f"Label {value}")
    rgb = _FALLBACK_RGB[(value - 1) % len(_FALLBACK_RGB)]
    snomed = label.get("snomed")
    entry = TerminologyEntry(ANATOMICAL_STRUCTURE, Code("SCT", str(snomed), name)) if snomed else None
    return Structure(name, entry, rgb)


DEFAULT_LABELS = [{"value": 1, "name": "Pancreas", "snomed": "15776009"}]
"""Labels assumed when a model card does not list any."""
