"""Synthetic demo dataset bundled with llmclf.

Generates short English news-topic leads in four classes ("World", "Sports",
"Business", "Sci/Tech"), in the spirit of AG News but written entirely from
our own templates and made-up names. It exists so that the demo and tests run
offline and no third-party dataset text has to be committed or downloaded.

Generation is pure standard library and fully deterministic for a given seed.
Roughly 10% of examples are deliberately "hard" (cross-topic vocabulary, e.g.
a business story about a sports-club sale) so the task is not pure keyword
matching, while each example keeps one unambiguous intended label.

Run ``python3 tools/demo_data.py`` to (re)write src/llmclf/resources/demo_news.csv.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

LABELS = ("World", "Sports", "Business", "Sci/Tech")
MIN_WORDS, MAX_WORDS = 15, 45
HARD_FRACTION = 0.1
DEFAULT_CSV = Path(__file__).resolve().parent.parent / "src" / "llmclf" / "resources" / "demo_news.csv"


def _words(s: str) -> list[str]:
    return [w.strip() for w in s.split("|")]


# Made-up proper names are built from parts so that there are many
# combinations without ever naming a real club, athlete or company.
_TOWNS = _words(
    "Karnford|Millbrook|Eastvale|Dunmore|Lakeshire|Port Aster|Redhaven|Silverton|Brackwell|Orinda Bay|Hollin|Westmarch"
)
_MASCOTS = _words("Rovers|Falcons|Mariners|Comets|Wolves|Rangers|Titans|Harriers|Lions|Pilots")
_FIRST = _words(
    "Lena|Marco|Ayesha|Tomas|Priya|Jonah|Keiko|Rafael|Ingrid|Dario|Nadia|Owen|Sofia|Kwame|Elin|Mateo"
)
_LAST = _words(
    "Varga|Okafor|Lindqvist|Moreau|Takeda|Brennan|Castell|Novak|Adeyemi|Halvorsen|Duarte|Petrov|Aldana|Whitcombe"
)
_CO_A = _words(
    "Norvell|Quintara|Brightwater|Helix|Cobalt Ridge|Arden|Meridian Crest|Talvo|Northgate|Sablewood|Vantor|Pellucid"
)
_CO_B = _words("Holdings|Group|Industries|Foods|Logistics|Motors|Capital|Retail|Energy|Airlines")
_TECH_B = _words("Labs|Systems|Robotics|Networks|Semiconductor|AI|Software|Quantum")

VOCAB: dict[str, list[str]] = {
    # Shared, topic-neutral vocabulary that appears in every class.
    "country": _words(
        "Norway|Chile|Kenya|Vietnam|Poland|Canada|Brazil|Indonesia|Morocco|Finland|Peru|Ghana|Portugal|South Korea|Egypt|New Zealand|Mexico|India"
    ),
    "city": _words(
        "Lisbon|Nairobi|Toronto|Seoul|Lima|Oslo|Hanoi|Warsaw|Cairo|Jakarta|Accra|Santiago|Auckland|Mumbai|Marseille"
    ),
    "day": _words("Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"),
    "month": _words("March|April|June|September|October|November"),
    "num": [str(n) for n in (12, 15, 18, 24, 30, 40, 65, 120, 300)],
    "small": [str(n) for n in (3, 4, 5, 6, 7, 8, 9, 11)],
    "ordinal": _words("second|third|fourth|fifth|sixth|seventh"),
    "pct": [f"{p} percent" for p in ("1.2", "2.5", "3", "4.8", "6", "7.5", "11", "14", "22")],
    "verb": _words("announced|confirmed|said|revealed|disclosed"),
    # World
    "leader": _words(
        "the prime minister|the foreign minister|the president|the defence minister|the interior minister|the opposition leader|the finance minister"
    ),
    "org": _words(
        "the United Nations|the African Union|the European Union|regional mediators|a coalition of aid agencies|the Red Cross|a UN envoy"
    ),
    "issue": _words(
        "a ceasefire|the border dispute|a prisoner exchange|refugee resettlement|a disputed election|water-sharing rights|a maritime boundary|the release of detained journalists"
    ),
    "event_w": _words(
        "protests|floods|an earthquake|clashes|a general strike|a cyclone|wildfires|a coup attempt"
    ),
    "group": _words(
        "rebel groups|opposition parties|lawmakers|election monitors|aid workers|protesters|tribal elders"
    ),
    # Sports
    "team": [f"{t} {m}" for t in _TOWNS for m in _MASCOTS],
    "athlete": [f"{f} {last}" for f in _FIRST for last in _LAST],
    "sport": _words("football|tennis|cricket|rugby|basketball|cycling|athletics|hockey"),
    "event_s": _words(
        "the national cup|the world championships|the continental final|the spring open|the league playoffs|the Grand Tour|the indoor championships"
    ),
    "score": _words("2-1|3-0|1-0|4-2|3-1|87-79|24-17|31-28"),
    "draw": _words("1-1|2-2|3-3"),
    "stage": _words("semifinal|quarterfinal|final|title decider"),
    # Business
    "company": [f"{a} {b}" for a in _CO_A for b in _CO_B],
    "exec": _words("chief executive|chief financial officer|chairman|founder|board"),
    "money": _words(
        "$1.2 billion|$340 million|$2.8 billion|$75 million|$4.1 billion|$610 million|€900 million|$18 million"
    ),
    "market": _words(
        "the stock market|bond markets|oil prices|the dollar|copper prices|shares in Asia|European stocks|gold"
    ),
    "product": _words(
        "frozen meals|electric buses|budget flights|home insurance|steel pipes|coffee pods|delivery services|cargo ships"
    ),
    "sector": _words("retail|banking|airline|shipping|mining|property|insurance|car-making"),
    # Sci/Tech
    "techco": [f"{a} {b}" for a in _CO_A for b in _TECH_B],
    "gadget": _words(
        "smartphone|smartwatch|search engine|operating system|chatbot|web browser|laptop|cloud service|chip"
    ),
    "agency": _words(
        "the space agency|the European Space Agency|NASA|the national space institute|a private launch company"
    ),
    "field": _words(
        "astronomers|geneticists|climate scientists|physicists|marine biologists|neuroscientists|materials scientists"
    ),
    "finding": _words(
        "a new species of deep-sea fish|water ice beneath the surface of a distant moon|a gene linked to ageing|a battery material that charges in minutes|evidence of an ancient ocean|a faster way to detect antibiotic resistance|a planet orbiting two stars"
    ),
    "mission": _words(
        "lunar lander|Mars orbiter|weather satellite|asteroid probe|space telescope|crew capsule"
    ),
    "threat": _words("a security flaw|a ransomware attack|a data breach|a software bug|a phishing campaign"),
    "institution": [f"the University of {t}" for t in _TOWNS]
    + _words("a national research institute|a team of independent researchers"),
}

# Optional second sentences: shared neutral ones keep all classes sharing
# reporting language; class ones add topical detail and length variety.
SHARED_TAILS = _words(
    "Officials said on {day} that further details would be released later this month.|"
    "The announcement came after weeks of speculation, according to a report published on {day}.|"
    "A spokesperson declined to comment further when contacted on {day}.|"
    "Analysts said the move had been widely expected since {month}."
)

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "World": {
        "lead": _words(
            "{leader} of {country} arrived in {city} on {day} for talks on {issue}, {org} said.|"
            "{org} called for calm after {event_w} left at least {num} people dead in {country}.|"
            "Thousands of people marched through {city} on {day} demanding new elections, as {group} accused the government of fraud.|"
            "{country} and its neighbour reached a deal on {issue} after talks brokered by {org} in {city}.|"
            "Voters in {country} head to the polls on {day} in a tightly contested election that {group} say could reshape the region.|"
            "{leader} of {country} resigned on {day}, days after {event_w} hit the capital.|"
            "Rescue teams searched for survivors in {country} after {event_w} destroyed hundreds of homes, officials said on {day}.|"
            "{org} warned that {num} thousand people had fled the fighting in northern {country} since {month}.|"
            "Diplomats from {small} countries met in {city} to discuss {issue}, but no agreement was reached.|"
            "{country} recalled its ambassador on {day} in a growing row over {issue}.|"
            "{group} in {country} rejected a peace proposal put forward by {org}, saying it ignored their demands.|"
            "Parliament in {country} voted on {day} to extend a state of emergency imposed after {event_w}.|"
            "Police in {city} detained dozens of people during anti-government protests, {leader} {verb} on {day}."
        ),
        "tail": _words(
            "The talks are expected to resume in {city} next week.|"
            "{org} said aid convoys were still unable to reach the worst-hit areas.|"
            "The government has imposed a curfew in several provinces.|"
            "Neighbouring countries have offered to send emergency supplies."
        ),
        # Hard: economic or technical vocabulary, but the story is diplomacy or conflict.
        "hard": _words(
            "{country} imposed sanctions on its neighbour on {day}, freezing assets of officials it accused of backing {group} near the border.|"
            "Satellite images released by {org} appear to show troops massing near the border of {country}, raising fears of renewed fighting.|"
            "{leader} of {country} told a summit in {city} that the question of {issue} must be settled before any trade deal with its neighbour is signed.|"
            "A delegation from {country} walked out of talks in {city}, accusing {org} of siding with {group}."
        ),
    },
    "Sports": {
        "lead": _words(
            "The {team} beat the {team2} {score} on {day} to reach the {stage} of {event_s}.|"
            "{athlete} won {event_s} in {city} on {day}, a {ordinal} title of the season.|"
            "{athlete} scored twice as the {team} came from behind to win {score} against the {team2}.|"
            "The {team} sacked their head coach on {day} after a run of {small} games without a win.|"
            "{athlete} withdrew from {event_s} with a knee injury, organisers {verb} on {day}.|"
            "The {team} signed striker {athlete} on a three-year contract, the club {verb} on {day}.|"
            "Defending champion {athlete} was knocked out in the {stage} of {event_s} after a five-set thriller.|"
            "{country} will host {event_s} in {month} next year, the {sport} federation {verb}.|"
            "{athlete} broke the national record in the 400 metres at the meeting in {city} on {day}.|"
            "The {team} clinched the league title with {small} games to spare after a {score} win over the {team2}.|"
            "{athlete} was named captain of the {country} {sport} squad ahead of {event_s}.|"
            "A late goal from {athlete} earned the {team} a {draw} draw with the {team2} on {day}.|"
            "Veteran {sport} star {athlete} announced a retirement on {day} after {small} seasons at the top level."
        ),
        "tail": _words(
            "The {team} travel to {city} for their next match on {day}.|"
            "The coach said the squad would rest key players before the {stage}.|"
            "Tickets for the {stage} sold out within hours, organisers said.|"
            "{athlete2} finished second, {small} seconds behind the winner."
        ),
        # Hard: money, government or medical vocabulary, but the story is about play.
        "hard": _words(
            "Government officials in {country} confirmed on {day} that {event_s} will go ahead in {city}, and the {team} open the tournament against the {team2}.|"
            "Doctors cleared {athlete} to play in the {stage} after a scan on {day}, boosting the {team} ahead of their clash with the {team2}.|"
            "{athlete} shrugged off talk of a record sponsorship deal and said winning was the only focus at {event_s} in {city}.|"
            "The {team} said on {day} that ticket revenue did not matter and that beating the {team2} in the {stage} was the only target."
        ),
    },
    "Business": {
        "lead": _words(
            "{company} {verb} on {day} that quarterly profit rose {pct}, beating analysts' forecasts on strong demand for {product}.|"
            "{company} agreed to buy rival {company2} for {money} in a deal that will create the country's largest {sector} group.|"
            "Shares in {company} fell {pct} on {day} after the firm cut its full-year sales outlook.|"
            "{market} rose on {day} as investors bet that the central bank would hold interest rates steady.|"
            "The {exec} of {company} stepped down on {day} following a board dispute over the company's strategy.|"
            "{company} plans to cut {num}0 jobs and close {small} plants as demand for {product} slows.|"
            "Inflation in {country} eased to {pct} in {month}, giving the central bank room to cut borrowing costs.|"
            "{company} raised {money} in its stock market debut in {city}, valuing the firm at several times that sum.|"
            "Regulators in {country} fined {company} {money} for misleading customers about the price of {product}.|"
            "{market} slipped for a third day on {day} amid worries about slowing growth in {country}.|"
            "{company} reported a {pct} drop in revenue, blaming higher fuel costs and weak consumer spending.|"
            "Workers at {company} began a strike on {day} over pay, halting deliveries of {product} across {country}.|"
            "The {sector} industry in {country} expects sales to grow {pct} next year, a trade group {verb}."
        ),
        "tail": _words(
            "The company's shares have gained {pct2} since the start of the year.|"
            "Analysts said margins would remain under pressure through the end of the year.|"
            "The deal still requires approval from competition regulators in {country}.|"
            "The {exec} said the company would keep investing in new markets."
        ),
        # Hard: sports or tech vocabulary, but the story is about money and deals.
        "hard": _words(
            "{company} agreed to buy the {team} football club for {money}, betting that broadcast rights will lift its media revenue.|"
            "{techco} shares jumped {pct} on {day} after the company reported record quarterly profit and raised its dividend.|"
            "The owners of the {team} put the club up for sale on {day}, hiring bankers to find a buyer willing to pay about {money}.|"
            "{company} won a {money} sponsorship contract for {event_s}, a deal analysts said would lift its annual sales by {pct}."
        ),
    },
    "Sci/Tech": {
        "lead": _words(
            "{field} at {institution} {verb} on {day} that they had discovered {finding}.|"
            "{techco} unveiled a new {gadget} on {day} that it says uses far less power than previous models.|"
            "{agency} launched a new {mission} from a site in {country} on {day}, beginning a {small}-month journey.|"
            "{techco} confirmed {threat} affected millions of users of its {gadget} and urged them to update immediately.|"
            "A study by {field} at {institution} suggests that {finding} may change how textbooks describe the early solar system.|"
            "{techco} will release an update to its {gadget} in {month} that adds offline translation in {small} languages.|"
            "Engineers at {agency} said the {mission} had sent back its first images after a successful deployment.|"
            "{field} used a supercomputer to simulate how glaciers in {country} could shrink by {pct} within a decade.|"
            "Security researchers warned on {day} that {threat} was targeting users of a popular {gadget}.|"
            "{techco} said its new chip design could make artificial intelligence models run {small} times faster on phones.|"
            "A new paper from {institution} reports {finding}, a result independent {field} called surprising.|"
            "{agency} postponed the launch of its {mission} after engineers found a fault in a fuel valve.|"
            "{techco} opened its {gadget} software to outside developers on {day}, hoping to attract new apps."
        ),
        "tail": _words(
            "The findings were published in a peer-reviewed journal on {day}.|"
            "The company said the feature would reach older devices later this year.|"
            "Further tests are planned over the coming months.|"
            "The researchers said the data would be shared openly with other scientists."
        ),
        # Hard: government, business or sports vocabulary, but the story is about technology or science.
        "hard": _words(
            "The government of {country} proposed rules on {day} requiring makers of any {gadget} to fix {threat} within {small} days of discovery.|"
            "{techco} was ordered by regulators in {country} to change how its {gadget} collects location data from users.|"
            "Engineers at {institution} built a wearable sensor that tracks the muscle fatigue of {sport} players in real time.|"
            "Lawmakers in {country} approved funding for {agency} to build a new {mission}, the first the nation will design itself."
        ),
    },
}


class _Slots(dict):
    """Fills template slots lazily; `{team2}` draws from `team` but differs from `{team}`."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        base = key.rstrip("0123456789")
        while (value := self.rng.choice(VOCAB[base])) in self.values():
            pass
        self[key] = value
        return value


def _sentence(template: str, slots: _Slots) -> str:
    text = template.format_map(slots)
    return text[0].upper() + text[1:]  # slots like "the president" may start a sentence


def _make(label: str, rng: random.Random, hard: bool) -> str:
    parts = TEMPLATES[label]
    slots = _Slots(rng)
    sentences = [_sentence(rng.choice(parts["hard" if hard else "lead"]), slots)]
    # ~half get a second sentence, mixing topical and neutral tails, for length variety.
    if rng.random() < 0.5:
        tails = parts["tail"] if rng.random() < 0.6 else SHARED_TAILS
        sentences.append(_sentence(rng.choice(tails), slots))
    return " ".join(sentences)


def generate(n_per_class: int = 120, seed: int = 13) -> list[tuple[str, str]]:
    """Return `n_per_class` unique (text, label) pairs per label, shuffled with `seed`."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    n_hard = round(n_per_class * HARD_FRACTION)
    for label in LABELS:
        made, attempts = 0, 0
        while made < n_per_class:
            attempts += 1
            if attempts > 200 * n_per_class:  # vocabulary too small for the request
                raise RuntimeError(f"could not make {n_per_class} unique {label} texts")
            text = _make(label, rng, hard=made < n_hard)
            if text in seen or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                continue
            seen.add(text)
            rows.append((text, label))
            made += 1
    rng.shuffle(rows)
    assert len({t for t, _ in rows}) == len(rows), "demo texts must be unique"
    return rows


def write_csv(path: str | Path, n_per_class: int = 120, seed: int = 13) -> list[tuple[str, str]]:
    """Write the demo dataset to `path` as a UTF-8 CSV with header `text,label`."""
    rows = generate(n_per_class, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return rows


def main() -> None:
    rows = write_csv(DEFAULT_CSV)
    print(f"wrote {len(rows)} rows to {DEFAULT_CSV}")
    for label, count in sorted(Counter(label for _, label in rows).items()):
        print(f"  {label}: {count}")


if __name__ == "__main__":
    main()
