"""Labelled text for the on-device detector (client_sdk.detect): synthesized with Faker, Austen's novels with hand-built
lists of their people and places (bench/data/austen-entities.json), WikiText-2 labelled as far as lists allow.

A labelled text is `Labelled(text, spans, unknown)`: `spans` are the gold (start, end, label) character spans;
`unknown` spans are words whose label nobody knows (a capitalised word mid-sentence that no list names): training
ignores them and the benchmark counts them neither way.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client_sdk.detect import tokenize

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ENTITIES = Path(__file__).parent / "data" / "austen-entities.json"
TRAINING_NOVELS = ("prideprejudice", "sensesensibility", "mansfieldpark", "northangerabbey")
HELD_OUT_NOVEL = "emma"
LOCALES = ("en_US", "en_GB", "en_AU", "en_CA", "en_IE", "en_IN", "en_NZ", "de_DE", "de_AT", "fr_FR", "fr_CA",
           "es_ES", "es_MX", "it_IT", "nl_NL", "pt_BR", "pt_PT", "pl_PL", "sv_SE", "da_DK", "no_NO", "fi_FI",
           "cs_CZ", "tr_TR", "ro_RO", "hu_HU", "id_ID", "fil_PH", "hr_HR", "sk_SK", "sl_SI", "lt_LT", "et_EE")
# Words capitalised for grammar, not because they name someone: never a name label, never "unknown".
NOT_NAMES = frozenset("""i mr mrs ms miss sir lady lord dr colonel captain general admiral master madam madame rev
    monday tuesday wednesday thursday friday saturday sunday january february march april may june july august
    september october november december christmas easter michaelmas midsummer god heaven heavens providence english
    irish scotch scottish french italian german christian oh ah o chapter volume book end yes no aye tis humph
    farmer vicar grandpapa grandmama papa mamma misses mistresses lords""".split())


@dataclass
class Labelled:
    text: str
    spans: list[tuple[int, int, str]]
    unknown: list[tuple[int, int]] = field(default_factory=list)


def data_dir() -> Path:
    return DATA.resolve()


# -- synthesized ---------------------------------------------------------------------------------------------

# Slots: {person} {first} {last} {title} {city} {country} {state} {address} {street} {company} {email} {phone}
# {card} {iban} {account} {ssn} {ni} {dob} {date}. The last HELD_OUT_TEMPLATES are only used for evaluation.
TEMPLATES = [
    "Write a birthday greeting for {person}, who lives in {city}.",
    "My name is {person} and I was born on {dob}. Can you help me fill in this form?",
    "Please email {first} at {email} about the meeting in {city} on {date}.",
    "Call {title} {last} on {phone} before Friday.",
    "I work at {company} in {city}, {country}. How do I ask my manager {first} for a raise?",
    "Draft a complaint to {company}: my card {card} was charged twice.",
    "Transfer 250 euros to {person}, IBAN {iban}, reference invoice 2231.",
    "My SSN is {ssn}; is it safe to give it to {company}?",
    "My National Insurance number is {ni}. Which form do I send to HMRC?",
    "Ship the parcel to {person}, {address}.",
    "{person} from {city} wants to rent a flat near {street}. What should she ask the landlord?",
    "Summarise this email: Hi {first}, thanks for the call yesterday. {first2} and I will visit {city} next week. Best, {person2}",
    "Can you translate this for {title} {last}: the invoice for {company} is attached.",
    "Our new colleague {person} joins the {city} office of {company} on Monday.",
    "How far is {city} from {city2}?",
    "Remind me to pay {person} back. Account number {account}, sort code {sortcode}.",
    "Dear {title} {last}, your appointment at {company} on {date} is confirmed.",
    "{first} told me that {first2} moved to {country} last year.",
    "Write a short poem for my daughter {first}.",
    "Is {company} a good employer? My friend {person} applied there.",
    "I'm planning a trip from {city} to {country} with {first} and {first2}.",
    "Patient: {person}, DOB {dob}, phone {phone}, address {address}.",
    "Contact: {person} <{email}>, {company}, {city}",
    "My date of birth is {dob} and my phone number is {phone}.",
    "{person} ({email}) asked whether {company} can deliver to {state}.",
    "Tell {first} that the keys are with {title} {last} at {address}.",
    "What's a good restaurant in {city} for a dinner with {person}?",
    "Please update my card to {card}, expiry 08/27, name {person}.",
    "The contract between {company} and {company2} was signed in {city} by {person}.",
    "Help me reply to {first}: she wants to know if I can come to {city} on {date}.",
    "Explain how compound interest works, using {first}'s savings account as an example.",
    "Reset the password for {email}; the user is {person}, employee of {company}.",
    "I live at {address}. Which council tax band am I likely in?",
    "Book a table for two under the name {last} at 7pm.",
    "Thank {person} for the flowers she sent from {city}.",
    "{first}, can you check the delivery to {street}, {city}?",
    "Send the invoice to {company}, attention {person}, {address}.",
    "My brother {first} lost his wallet in {city}; his card number was {card}.",
    "Could {title} {last} from {company} call me on {phone}?",
    "Write a cover letter for {person} applying to {company} in {city}.",
    "What documents does {person} need to move from {country} to {country2}?",
    "Pay {iban} the sum of 80 pounds for {first}'s piano lessons.",
    "The customer {person} (SSN {ssn}) disputes a charge from {company}.",
    "Note for {first}: {first2} called from {company}, call back on {phone}.",
    "Who won the match between {city} and {city2} last season?",
    "My grandmother {person} was born in {city} on {dob}.",
    "{person} and {person2} are getting married in {city} in June.",
    "Tell me about the history of {city}.",
    "Ask {first} whether the {company} report is ready.",
    "A lunch with {person} and the team from {company} at {address}.",
    "Can you proofread: {title} {last} was appointed chief financial officer of {company} in {country}.",
    "My passport says {person}, born {dob} in {city}.",
    "Write a thank-you note to {first} for helping me move to {street}.",
    "Pay the invoice from {company} to account {account} by {date}.",
    "What time is it in {country} when it is noon in {city}?",
    "I met {person} at the conference in {city}; how do I follow up by email at {email}?",
    "Please forward this to {person} and cc {email}.",
    "{title} {last} of {company} will speak in {city} about {country}'s economy.",
    "Our landlord {person} lives at {address} and his phone is {phone}.",
    "Could you write a limerick about {first} from {city}?",
    "Schedule a call with {person} from {company} for {date}.",
    "My son {first} starts school in {city} this autumn.",
    "Hi {first}, thanks for your message. I will call you on {phone} tomorrow.",
    "Hello {first}! Could you send me the notes from Tuesday?",
    "Hey {first}, are we still on for lunch with {first2}?",
    "Hello, can you help me with my homework? It is about the French Revolution.",
    "Hi there! What is 15% of 240, and how many days are there in March 2024?",
    "Explain the causes of the Second World War in 200 words.",
    "Write a Python function that sorts 10 numbers. Thanks!",
    "I need 4 eggs, 250 g of flour and 2 cups of milk. What can I bake?",
    "In 1999 the town had 12,000 inhabitants; by 2020 it had 15,500. What is the growth rate?",
    "Thanks, that was helpful. Can you make it shorter?",
    "Which is better for a beginner, Spanish or German?",
    "Good morning! Please summarise the report in 3 bullet points.",
    "What happened at the Battle of Hastings in 1066?",
    "Room 12 on the 3rd floor is booked from 9:30 to 11:00 on Monday.",
    # held out: only for evaluation
    "Hello, this is {person}. My card {card} expires soon and I moved to {address}.",
    "Can you send {title} {last} a reminder that the rent is due? Her email is {email}.",
    "{person}, {company}, {city}, phone {phone}",
    "I was born on {dob} in {city}, {country}; my NI number is {ni}.",
    "Wire the deposit to {iban} for {person} (account {account}).",
    "Write a message to {first} saying I will be late to {company}'s party in {city}.",
    "What should {person} pack for a week in {country}?",
    "{first} and {first2} met at {company} in {city} and now live on {street}.",
    "My US social security number is {ssn} and my date of birth is {dob}.",
    "Dinner with {person} at {address} on {date}; call {phone} if late.",
]
HELD_OUT_TEMPLATES = 10
TITLES = ("Mr.", "Mrs.", "Ms.", "Dr.", "Mr", "Mrs", "Miss", "Prof.")
_SLOT = re.compile(r"\{(\w+?)\}")


def _date(fake, rng: random.Random) -> str:
    day = fake.date_of_birth(minimum_age=1, maximum_age=90)
    formats = ["%d/%m/%Y", "%m/%d/%Y", "%Y-%m-%d", "%d %B %Y", "%B %d, %Y", "%d.%m.%Y", "%d-%m-%Y", "%-d %b %Y"]
    return day.strftime(rng.choice(formats))


def _ni_number(rng: random.Random) -> str:
    first, second = "ABCEGHJKLMNOPRSTWXYZ", "ABCEGHJKLMNPRSTWXYZ"
    prefix = rng.choice(first) + rng.choice(second)
    while prefix in ("BG", "GB", "KN", "NK", "NT", "TN"):
        prefix = rng.choice(first) + rng.choice(second)
    digits = "".join(rng.choice("0123456789") for _ in range(6))
    body = f"{prefix} {digits[:2]} {digits[2:4]} {digits[4:]} " if rng.random() < 0.5 else prefix + digits
    return body + rng.choice("ABCD")


def _value(slot: str, fakes: dict, rng: random.Random) -> tuple[str, str | None]:
    """(text, gold label or None) for one template slot."""
    base = slot.rstrip("2")
    fake = fakes["en"] if base in ("ssn", "card", "email") else rng.choice(fakes["all"])

    def draw(method: str) -> str:  # not every locale has every provider
        try:
            return getattr(fake, method)()
        except AttributeError:
            return getattr(fakes["en"], method)()

    if base == "person":
        return f"{draw('first_name')} {draw('last_name')}", "PERSON"
    if base in ("first", "last"):
        return draw(f"{base}_name"), "PERSON"
    if base == "title":
        return rng.choice(TITLES), None
    simple = {"city": ("city", "LOCATION"), "country": ("country", "LOCATION"), "state": ("state", "LOCATION"),
              "street": ("street_name", "LOCATION"), "company": ("company", "ORGANIZATION"),
              "email": ("email", "EMAIL"), "phone": ("phone_number", "PHONE")}
    if base in simple:
        method, label = simple[base]
        return draw(method), label
    if base == "address":
        return re.sub(r"\s*\n\s*", ", ", draw("address")), "LOCATION"
    if base == "card":
        number = fake.credit_card_number()
        return (" ".join(number[i:i + 4] for i in range(0, len(number), 4)) if rng.random() < 0.5 else number), "CARD"
    if base == "iban":
        iban = draw("iban")
        return (" ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban), "IBAN"
    if base == "account":
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(8, 12))), "ACCOUNT"
    if base == "sortcode":
        return "-".join(f"{rng.randint(0, 99):02d}" for _ in range(3)), "ACCOUNT"
    if base == "ssn":
        return fake.ssn(), "SSN"
    if base == "ni":
        return _ni_number(rng), "NI_NUMBER"
    if base == "dob":
        return _date(fake, rng), "DATE_OF_BIRTH"
    if base == "date":
        return _date(fake, rng), "DATE"
    raise KeyError(slot)


def fakers(seed: int):
    from faker import Faker

    all_locales = []
    for i, locale in enumerate(LOCALES):
        fake = Faker(locale)
        fake.seed_instance(seed * 1000 + i)
        all_locales.append(fake)
    return {"en": all_locales[0], "all": all_locales}


def synthesized(n: int, seed: int, held_out: bool) -> list[Labelled]:
    """n texts from the training templates (or the held-out ones), values from Faker in many locales."""
    rng = random.Random(seed)
    fakes = fakers(seed)
    templates = TEMPLATES[-HELD_OUT_TEMPLATES:] if held_out else TEMPLATES[:-HELD_OUT_TEMPLATES]
    out = []
    for _ in range(n):
        template = rng.choice(templates)
        text, spans, last = "", [], 0
        lowercase = not held_out and rng.random() < 0.05  # people sometimes type names in lower case
        for match in _SLOT.finditer(template):
            text += template[last : match.start()]
            value, label = _value(match.group(1), fakes, rng)
            if lowercase and label == "PERSON":
                value = value.lower()
            if label:
                spans.append((len(text), len(text) + len(value), label))
            text += value
            last = match.end()
        out.append(Labelled(text + template[last:], spans))
    return out


def gazetteers(seed: int = 0, samples: int = 400) -> dict[str, list[str]]:
    """Lower-case words of Faker's first names, last names, cities, countries, streets and companies."""
    fakes = fakers(seed)["all"]
    kinds = {"first": lambda f: f.first_name(), "last": lambda f: f.last_name(), "city": lambda f: f.city(),
             "country": lambda f: f.country(), "street": lambda f: f.street_suffix() if hasattr(f, "street_suffix") else "",
             "company": lambda f: f.company_suffix() if hasattr(f, "company_suffix") else ""}
    out = {}
    for kind, draw in kinds.items():
        words = Counter()
        for fake in fakes:
            for _ in range(samples):
                words.update(w.lower() for w in re.findall(r"[^\W\d_]+", draw(fake)))
        out[kind] = sorted(words)
    return out


def casing(min_count: int = 3) -> dict[str, int]:
    """For each word seen at least `min_count` times in the training novels and WikiText-2 valid (lower-cased),
    how often it is written in lower case: 0 (under 10% of the time), 1 (under 50%), 2 (under 90%), 3 (more)."""
    lower, total = Counter(), Counter()
    for path in [data_dir() / "austen" / f"{n}.txt" for n in TRAINING_NOVELS] + [data_dir() / "wikitext-2" / "valid.txt"]:
        for word in re.findall(r"\b[^\W\d_]+\b", path.read_text(encoding="utf-8")):
            low = word.lower()
            total[low] += 1
            lower[low] += word == low
    return {w: int(np.searchsorted([0.1, 0.5, 0.9], lower[w] / n, side="right")) for w, n in total.items() if n >= min_count}


def common_words(casing: dict[str, int]) -> frozenset[str]:
    """Words written in lower case more often than not."""
    return frozenset(w for w, bucket in casing.items() if bucket >= 2)


# -- Austen --------------------------------------------------------------------------------------------------

def novel_chunks(name: str, words: int = 150) -> list[str]:
    """The novel's paragraphs (lines joined, italics' underscores dropped), grouped into chunks of about `words`
    words, chapter headings dropped."""
    text = (data_dir() / "austen" / f"{name}.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.replace("_", "").split()) for p in re.split(r"\n\s*\n", text)]  # _italics_
    paragraphs = [p for p in paragraphs if p and not re.fullmatch(r"(?:CHAPTER|VOLUME) [IVXLC\d]+\.?|[A-Z .,]+", p)]
    chunks, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(c.split()) for c in current) >= words:
            chunks.append(" ".join(current))
            current = []
    if current:
        chunks.append(" ".join(current))
    return chunks


def entity_pattern(entities: dict[str, list[str]]) -> tuple[re.Pattern[str], dict[str, str]]:
    names = {name: label for label, listed in entities.items() for name in listed}
    pattern = re.compile("|".join(rf"(?<![\w-])(?<!\w['’]){re.escape(n)}(?![\w-]|['’](?![sS]\b))"
                                  for n in sorted(names, key=len, reverse=True)))
    return pattern, names


def label_prose(text: str, pattern: re.Pattern[str], names: dict[str, str], common: frozenset[str],
                initial_unknown: bool = False) -> Labelled:
    """Gold spans where a listed name occurs; a capitalised word mid-sentence (or anywhere, `initial_unknown`) that
    no list names and that is not a common lower-case word is unknown."""
    spans = [(m.start(), m.end(), names[m.group(0)]) for m in pattern.finditer(text)]
    covered = {i for s, e, _ in spans for i in range(s, e)}
    unknown = []
    words, offsets, starts = tokenize(text)
    for word, (s, e), start in zip(words, offsets, starts):
        if s in covered or not word[:1].isupper() or word.lower() in NOT_NAMES:
            continue
        if (initial_unknown or not start) and word.lower() not in common:
            unknown.append((s, e))
    return Labelled(text, spans, unknown)


def novel(name: str, common: frozenset[str]) -> list[Labelled]:
    pattern, names = entity_pattern(json.loads(ENTITIES.read_text())[name])
    return [label_prose(chunk, pattern, names, common) for chunk in novel_chunks(name)]


def wikitext_valid(common: frozenset[str]) -> list[Labelled]:
    """WikiText-2 valid's running text with no names listed: lower-case words, numbers and capitalised common
    words are O, every other capitalised word unknown (training learns what is not a name from it)."""
    nothing = re.compile(r"(?!)")
    lines = [line.strip() for line in (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()]
    return [label_prose(line, nothing, {}, common, initial_unknown=True) for line in lines
            if line and not line.startswith("=") and len(line.split()) >= 20]


# -- WikiText-2 test ------------------------------------------------------------------------------------------

def wikitext_test(gazetteer: dict[str, list[str]], common: frozenset[str], lines: int = 400) -> list[Labelled]:
    """WikiText-2 test's articles' lines, labelled as far as lists allow: a country (Faker's list) is a LOCATION,
    a first name (Faker's, not a common word) followed by capitalised words is a PERSON; every other capitalised
    word that is not a common word is unknown (precision is then a lower bound: WikiText names many people, places
    and organisations no list here has). Only lines of running text (not headings), the first `lines` of them."""
    countries = {c for c in (gazetteer_countries())}
    firsts = frozenset(gazetteer["first"]) - common
    person = re.compile(r"\b([A-Z][a-z]+)((?: [A-Z][a-z]+)+)")
    country = re.compile("|".join(rf"\b{re.escape(c)}\b" for c in sorted(countries, key=len, reverse=True)))
    out = []
    for line in (data_dir() / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("=") or len(line.split()) < 20:
            continue
        spans = [(m.start(), m.end(), "LOCATION") for m in country.finditer(line)]
        spans += [(m.start(), m.end(), "PERSON") for m in person.finditer(line)
                  if m.group(1).lower() in firsts and not any(s < m.end() and m.start() < e for s, e, _ in spans)]
        labelled = label_prose(line, re.compile(r"(?!)"), {}, common, initial_unknown=True)
        covered = {i for s, e, _ in spans for i in range(s, e)}
        out.append(Labelled(line, spans, [u for u in labelled.unknown if u[0] not in covered]))
        if len(out) >= lines:
            break
    return out


def gazetteer_countries() -> list[str]:
    from faker.providers.address.en import Provider

    return [c for c in Provider.countries if " " not in c or len(c.split()) <= 3]
