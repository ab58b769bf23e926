"""How many job titles the rules cleaner drops on pl-jobads (issue 23: "Magazynier tel. 600 100 200" lost its title).

Each ad's text is its title, a newline and the description. An ad's title survives when the cleaned text still holds
every word of the title (case-insensitive). Prints the counts and a few of the lost titles.

    .venv/bin/python experiments/title_survival.py
"""

from __future__ import annotations

import re

import pandas as pd
from common import DATA

from jobembed.clean.rules import RulesCleaner

WORD = re.compile(r"[^\W\d_]{2,}")  # words of letters: a phone number is meant to go


def main() -> None:
    ads = pd.read_csv(DATA / "pl-jobads" / "ads.csv", dtype=str, keep_default_na=False)
    ads = ads[ads["title"].str.strip() != ""]
    cleaner = RulesCleaner(language="pl")
    lost, contact_lost = [], 0
    for title, text in zip(ads["title"], ads["text"], strict=True):
        cleaned = set(WORD.findall(cleaner.clean(text).lower()))
        words = WORD.findall(title.lower())
        if words and not set(words) <= cleaned:
            lost.append(title)
            first_line = text.split("\n", 1)[0]
            if any(d == "contact line" for _, d in cleaner.explain(first_line)):
                contact_lost += 1
    print(f"{len(ads)} ads with a title; the title lost a word in {len(lost)} ({len(lost) / len(ads):.1%})")
    print(f"  of which the first line was dropped as a contact line: {contact_lost}")
    titles_alone = [t for t in ads["title"] if not cleaner.clean(t).strip()]
    print(f"titles that clean to nothing on their own: {len(titles_alone)}")
    for t in lost[:10]:
        print("  lost a word:", t)
    for t in titles_alone[:20]:
        print("  cleans to nothing alone:", t)


if __name__ == "__main__":
    main()
