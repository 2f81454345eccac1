"""An optional on-device detector that proposes private spans in a message (`pip install veil[detect]`).

Structured identifiers are found by pattern: emails, phone numbers, card numbers (Luhn-checked), account
numbers (IBAN and long digit runs), dates and street addresses. With presidio-analyzer installed, its
pattern recognizers run too; names (PERSON, LOCATION) are proposed only where presidio finds an installed
spaCy NER model, and the detector never downloads one. Detection only proposes: the app decides, and
without it the whole message stays private (the SDK's default).

    parts = detect_parts("Mail ann@example.com before 12 March 2025", treatment="placeholder")
    client.generate([{"role": "user", "content": parts}])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from client_sdk.spans import Part, Treatment

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
          r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
PATTERNS: dict[str, re.Pattern[str]] = {
    "EMAIL": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "IBAN": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
    "CARD": re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),
    "PHONE": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}\b"),
    "ACCOUNT": re.compile(r"\b\d{8,17}\b"),
    "DATE": re.compile(rf"\b(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}|\d{{4}}-\d{{2}}-\d{{2}}|"
                       rf"\d{{1,2}}(?:st|nd|rd|th)? {_MONTH}\.?,? \d{{4}}|{_MONTH}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})\b"),
    "ADDRESS": re.compile(r"\b\d{1,5} (?:[A-Z][a-z]+ ){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|"
                          r"Boulevard|Blvd|Court|Ct|Place|Pl|Square|Sq|Way|Terrace)\b\.?"),
}
_PRESIDIO_LABELS = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD", "IBAN_CODE": "IBAN",
                    "DATE_TIME": "DATE", "PERSON": "PERSON", "LOCATION": "LOCATION", "US_BANK_NUMBER": "ACCOUNT"}


@dataclass(frozen=True)
class Detection:
    """A proposed private span: text[start:end] of kind `label`."""

    start: int
    end: int
    label: str


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _pattern_detections(text: str) -> list[Detection]:
    found = []
    for label, pattern in PATTERNS.items():
        for m in pattern.finditer(text):
            digits = re.sub(r"\D", "", m.group(0))
            if label == "CARD" and not luhn_valid(digits):
                continue
            if label == "PHONE" and not 7 <= len(digits) <= 15:
                continue
            found.append(Detection(m.start(), m.end(), label))
    return found


@lru_cache(maxsize=1)
def _presidio():
    """presidio's pattern recognizers (cards, IBANs, phone numbers) and, only where a spaCy model is already
    installed, its NER analyzer for names; None without presidio. Its email recognizer is not used: it fetches a
    public-suffix list over the network."""
    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer import predefined_recognizers as recognizers
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError:
        return None
    patterns = [recognizers.CreditCardRecognizer(), recognizers.IbanRecognizer(), recognizers.PhoneRecognizer()]
    models = spacy.util.get_installed_models()  # never downloads: presidio would fetch a missing model
    ner = None
    if models:
        config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": models[0]}]}
        ner = AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=config).create_engine())
    return patterns, ner


def _presidio_detections(text: str) -> list[Detection]:
    loaded = _presidio()
    if loaded is None:
        return []
    patterns, ner = loaded
    results = [r for recognizer in patterns
               for r in recognizer.analyze(text, entities=recognizer.supported_entities, nlp_artifacts=None)]
    if ner is not None:
        results += ner.analyze(text=text, language="en", entities=["PERSON", "LOCATION"])
    return [Detection(r.start, r.end, _PRESIDIO_LABELS[r.entity_type]) for r in results
            if r.entity_type in _PRESIDIO_LABELS]


def detect(text: str) -> list[Detection]:
    """Proposed private spans, non-overlapping (the longest wins), in order."""
    candidates = sorted(_pattern_detections(text) + _presidio_detections(text), key=lambda d: (d.start, -(d.end - d.start)))
    chosen: list[Detection] = []
    for d in candidates:
        if chosen and d.start < chosen[-1].end:
            if d.end - d.start > chosen[-1].end - chosen[-1].start and d.start == chosen[-1].start:
                chosen[-1] = d
            continue
        chosen.append(d)
    return chosen


def detect_parts(text: str, treatment: Treatment = "noise") -> list[Part]:
    """The message as parts: detected spans private (`treatment`, placeholders labelled by kind), the rest public."""
    parts, last = [], 0
    for d in detect(text):
        if d.start > last:
            parts.append(Part(text[last : d.start], "public"))
        parts.append(Part(text[d.start : d.end], treatment, d.label))
        last = d.end
    if last < len(text):
        parts.append(Part(text[last:], "public"))
    return parts
