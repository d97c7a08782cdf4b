"""Build the llmclf benchmark suite: nine public labelled English text-classification datasets, each cut
to a fixed, seeded size, as `DIR/<name>/train.csv` and `DIR/<name>/test.csv` (columns `text,label`,
labels as readable names) plus `DIR/suite.json` describing them.

    python benchmarks/prepare_suite.py --out /work/suite-data                  # git dirs under /work/.mirror
    python benchmarks/prepare_suite.py --out DIR --git-dir yaolu/ordered-prompt=/path/to/repo.git ...

The data is never part of this repository: the script reads it out of local git directories of public
GitHub repositories (a bare clone or a mirror snapshot, `<root>/<owner>+<name>/repo` by default) with
`git show <commit>:<path>`, at the pinned commit when the git dir has it, else at HEAD (with a warning;
the commit used is recorded in suite.json).

| name              | kind                                  | classes | train | test | metric   |
|-------------------|---------------------------------------|---------|-------|------|----------|
| ag_news           | news topic                            | 4       | 2000  | 1000 | accuracy |
| sst2              | binary sentiment, short               | 2       | 2000  | 872  | accuracy |
| sst5              | graded sentiment, 5 levels            | 5       | 2000  | 1000 | accuracy |
| trec              | question type (coarse)                | 6       | 2000  | 500  | accuracy |
| banking77         | intent, many classes                  | 77      | 2000  | 1000 | accuracy |
| tweet_emotion     | short tweets, emotion (9% optimism)   | 4       | 2000  | 1000 | macro_f1 |
| sms_spam          | strongly imbalanced binary (13% spam) | 2       | 2000  | 1000 | macro_f1 |
| imdb_300          | long movie reviews, a few hundred     | 2       | 300   | 300  | accuracy |
| medical_abstracts | long medical abstracts, a few hundred | 5       | 248   | 496  | accuracy |

Sources (GitHub repository: paths in it):
- ag_news: HenryPengZou/JointMatch: data/ag_news/dev.csv (train pool), test.csv, classes.txt
- sst2: nkzhlee/Data_Augmentation: data/sst2/train.csv (GLUE SST-2 train: phrases), validation.csv (test:
  sentences; GLUE's test has no labels)
- sst5, trec: yaolu/ordered-prompt: data/{sst5,trec}/train.jsonl, test.jsonl (SST-5 sentences; TREC-6)
- banking77: congyingxia/IncrementalFSTC: data/banking77/train.csv, test.csv
- tweet_emotion: cardiffnlp/tweeteval: datasets/emotion/{train,test}_{text,labels}.txt, mapping.txt
- sms_spam: hamzaaacodes/sms-spam-collection: SMSSpamCollection (UCI SMS Spam Collection, one pool)
- imdb_300: ALjone/INF368-Final-Project: data/imdb/test.csv + train_labeled_50.csv (IMDB, 600 reviews, pooled)
- medical_abstracts: ALjone/INF368-Final-Project: data/medical/train_labeled_50.csv (train), test.csv
  (Medical Abstracts / Kaggle "medical-text", 50 per class to train)

Sizes are upper bounds drawn from the pools by a stratified, seeded sample (`--seed`, default 0), so class
proportions follow the source; where a pool is smaller than the size, all of it is used (sst2's 872 test
sentences, trec's 500, medical_abstracts's 248/496 left after cleaning). sms_spam and imdb_300 come as
one pool: the test set is drawn first, the train set from the rest.

Cleaning, the same for every dataset: text stripped and runs of whitespace collapsed; a pair of double
quotes wrapping a whole sentence (a CSV quoting artefact of the ordered-prompt files) removed; empty texts
dropped; a text that occurs with two different labels in a split dropped (all its copies); exact
duplicates (case-insensitive, whitespace collapsed) kept once; any train text that also occurs in the test
pool removed from the train pool. The counts removed are in suite.json under `removed`. Nothing else is
changed: AG News keeps its `#39;` entities and `\\` line breaks, SST and TREC their tokenised text.

Label names: ag_news from its classes.txt; sst5 "very negative".."very positive" (the usual SST-5 names
for 0..4); trec's ids as ordered-prompt's config/trec.yaml maps them (it calls id 2 "expression"; its
questions are "What does X stand for", TREC's ABBR class, named "abbreviation" here); banking77 its
category names; tweet_emotion its mapping.txt; medical_abstracts 1..5 as in the Medical Abstracts corpus
(Schopf et al. 2022; checked against the texts' vocabulary: tumour words in 1, liver/bowel in 2, ...).
Metric: accuracy, or macro-F1 where the classes are imbalanced (tweet_emotion, sms_spam).

Known quirks (measured on the seed-0 suite; see also `removed` in suite.json):
- sst2 trains on GLUE phrases (median 7 words, fragments of sentences, ~100 near-duplicate pairs such as
  "beautiful to watch" / "beautiful to watch and") but tests on whole sentences (median ~19 words).
- tweet_emotion: ~8% of train tweets carry an emotion hashtag (#angry, #sadness, ...), a partial leak;
  ~230 train tweets have a near-copy differing only in hashtags, 60 of those pairs with different labels.
- medical_abstracts: the corpus files some abstracts under two classes (4 such test rows dropped, 2 train
  abstracts also in test dropped); texts are long (median ~180 words, p95 ~340).
- imdb_300: long texts (median ~170 words, p95 ~675, max ~5,900 characters); HTML `<br />` kept.
- banking77: 5% of test queries have a near-copy (TF-IDF cosine >= 0.9) in train, as in the original.
- sms_spam: 415 exact duplicates removed; spam is templated (2% of test has a near-copy in train).
- trec: tokenised, some questions carry POS-tag debris from the source ("... for 1 , CD NNS IN NNP").

JointMatch's `threecrises` and `goemotions` folders are never read (kept aside as an independent check).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

DEFAULT_MIRROR_ROOT = Path("/work/.mirror")
KEPT_ASIDE = ("threecrises", "goemotions")  # never read from any source

# repo -> commit the suite was built from (used when the git dir has it)
PINNED = {
    "HenryPengZou/JointMatch": "e976613f55776ce597a2fa06c30ef02512bef82d",
    "nkzhlee/Data_Augmentation": "699d109eca7ced3e688f99cd9bfc4a2dd1feb5e3",
    "yaolu/ordered-prompt": "e93f70d0a5f6a8cfcadf6f2917c26eed265cd0be",
    "congyingxia/IncrementalFSTC": "88b17da85024e015372bb5171b271dfcfe6b6a1d",
    "cardiffnlp/tweeteval": "4fbd22cd78421f05b1ecdb4fc5725bc7a7bd8f66",
    "hamzaaacodes/sms-spam-collection": "f3e73e1e74e6330b62d1ee1983bba2a063184c26",
    "ALjone/INF368-Final-Project": "9121f2f23150fd8a6916a749a5ad8287d6945627",
}


# ------------------------------------------------------------------------------------------ git access
class Source:
    """One public repository's git dir, read at one commit."""

    def __init__(self, repo: str, git_dir: Path):
        self.repo, self.git_dir = repo, git_dir
        pinned = PINNED.get(repo)
        if pinned and self._git("cat-file", "-e", f"{pinned}^{{commit}}", check=False).returncode == 0:
            self.commit = pinned
        else:
            self.commit = self._git("rev-parse", "HEAD").stdout.decode().strip()
            if pinned:
                print(
                    f"warning: {repo}: pinned commit {pinned[:12]} absent, using HEAD {self.commit[:12]}",
                    file=sys.stderr,
                )
        self.paths: list[str] = []

    def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True, check=check)

    def read(self, path: str) -> bytes:
        if any(k in path for k in KEPT_ASIDE):
            raise ValueError(f"{path}: {KEPT_ASIDE} are kept aside and must not be read")
        proc = self._git("show", f"{self.commit}:{path}", check=False)
        if proc.returncode != 0:
            raise FileNotFoundError(
                f"{self.repo}@{self.commit[:12]}:{path}: {proc.stderr.decode().strip()} "
                "(a file of 4 MiB or more is absent from mirror snapshots)"
            )
        if proc.stdout.startswith(b"version https://git-lfs"):
            raise FileNotFoundError(f"{self.repo}:{path} is a Git LFS pointer, not the data")
        self.paths.append(path)
        return proc.stdout

    def csv(self, path: str, **kw) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(self.read(path)), **kw)

    def lines(self, path: str) -> list[str]:
        return self.read(path).decode("utf-8").splitlines()

    def jsonl(self, path: str) -> pd.DataFrame:
        return pd.DataFrame([json.loads(line) for line in self.lines(path) if line.strip()])


def find_git_dir(repo: str, root: Path, overrides: dict[str, Path]) -> Path:
    if repo in overrides:
        return overrides[repo]
    for cand in (
        root / repo.replace("/", "+") / "repo",
        root / repo.replace("/", "+"),
        root / (repo.replace("/", "+") + ".git"),
    ):
        if (cand / "HEAD").is_file() and (cand / "objects").is_dir():
            return cand
    raise SystemExit(f"no git dir for {repo} under {root} (fetch it, or pass --git-dir {repo}=PATH)")


# ------------------------------------------------------------------------------------------ datasets
Pools = tuple[pd.DataFrame, pd.DataFrame | None]  # (train pool, test pool); test None: split the one pool


def frame(texts, labels) -> pd.DataFrame:
    return pd.DataFrame({"text": list(texts), "label": [str(x) for x in labels]})


def load_ag_news(src: Source) -> Pools:
    names = [x.strip() for x in src.lines("data/ag_news/classes.txt") if x.strip()]

    def one(path):
        d = src.csv(path)
        return frame(d["content"], [names[int(i) - 1] for i in d["label"]])

    return one("data/ag_news/dev.csv"), one("data/ag_news/test.csv")


def load_sst2(src: Source) -> Pools:
    names = {0: "negative", 1: "positive"}

    def one(path):
        d = src.csv(path, header=None, names=["label", "text"])
        return frame(d["text"], d["label"].map(names))

    return one("data/sst2/train.csv"), one("data/sst2/validation.csv")  # GLUE's test has no labels (-1)


def load_sst5(src: Source) -> Pools:
    names = ["very negative", "negative", "neutral", "positive", "very positive"]

    def one(path):
        d = src.jsonl(path)
        return frame(d["sentence"], [names[int(i)] for i in d["label"]])

    return one("data/sst5/train.jsonl"), one("data/sst5/test.jsonl")


def load_trec(src: Source) -> Pools:
    names = ["description", "entity", "abbreviation", "human", "location", "number"]

    def one(path):
        d = src.jsonl(path)
        return frame(d["sentence"], [names[int(i)] for i in d["label"]])

    return one("data/trec/train.jsonl"), one("data/trec/test.jsonl")


def load_banking77(src: Source) -> Pools:
    def one(path):
        d = src.csv(path)
        return frame(d["text"], d["category"])

    return one("data/banking77/train.csv"), one("data/banking77/test.csv")


def load_tweet_emotion(src: Source) -> Pools:
    base = "datasets/emotion"
    names = dict(line.split("\t") for line in src.lines(f"{base}/mapping.txt") if line.strip())

    def one(split):
        texts, labels = src.lines(f"{base}/{split}_text.txt"), src.lines(f"{base}/{split}_labels.txt")
        if len(texts) != len(labels):
            raise ValueError(f"tweeteval emotion {split}: {len(texts)} texts, {len(labels)} labels")
        return frame(texts, [names[x.strip()].strip() for x in labels])

    return one("train"), one("test")


def load_sms_spam(src: Source) -> Pools:
    d = src.csv(
        "SMSSpamCollection",
        sep="\t",
        quoting=csv.QUOTE_NONE,
        header=None,
        names=["label", "text"],
        dtype=str,
        keep_default_na=False,
    )
    d = d[d["label"].isin(["ham", "spam"])]  # this copy has a "Label\tSMS" header line
    return frame(d["text"], d["label"]), None


def load_imdb_300(src: Source) -> Pools:
    names = {"neg": "negative", "pos": "positive"}
    d = pd.concat(
        [src.csv("data/imdb/test.csv"), src.csv("data/imdb/train_labeled_50.csv")], ignore_index=True
    )
    return frame(d["text"], d["label"].map(names)), None


def load_medical(src: Source) -> Pools:
    names = {
        1: "neoplasms",
        2: "digestive system diseases",
        3: "nervous system diseases",
        4: "cardiovascular diseases",
        5: "general pathological conditions",
    }

    def one(path):
        d = src.csv(path)
        return frame(d["text"], d["label"].astype(int).map(names))

    return one("data/medical/train_labeled_50.csv"), one("data/medical/test.csv")


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str
    repo: str
    load: Callable[[Source], Pools]
    n_train: int
    n_test: int
    metric: str = "accuracy"


SUITE = [
    Spec("ag_news", "topic (news)", "HenryPengZou/JointMatch", load_ag_news, 2000, 1000),
    Spec(
        "sst2",
        "sentiment, binary, short (GLUE SST-2: train phrases, test sentences)",
        "nkzhlee/Data_Augmentation",
        load_sst2,
        2000,
        1000,
    ),
    Spec(
        "sst5", "sentiment, graded 5 levels (SST-5 sentences)", "yaolu/ordered-prompt", load_sst5, 2000, 1000
    ),
    Spec("trec", "question type (TREC coarse)", "yaolu/ordered-prompt", load_trec, 2000, 1000),
    Spec(
        "banking77",
        "intent, 77 classes (banking queries)",
        "congyingxia/IncrementalFSTC",
        load_banking77,
        2000,
        1000,
    ),
    Spec(
        "tweet_emotion",
        "short tweets, emotion (tweet_eval)",
        "cardiffnlp/tweeteval",
        load_tweet_emotion,
        2000,
        1000,
        "macro_f1",
    ),
    Spec(
        "sms_spam",
        "strongly imbalanced binary (SMS spam, ~13% spam)",
        "hamzaaacodes/sms-spam-collection",
        load_sms_spam,
        2000,
        1000,
        "macro_f1",
    ),
    Spec(
        "imdb_300",
        "long texts (IMDB movie reviews), a few hundred to train",
        "ALjone/INF368-Final-Project",
        load_imdb_300,
        300,
        300,
    ),
    Spec(
        "medical_abstracts",
        "long domain texts (medical abstracts, 5 disease groups), few-shot",
        "ALjone/INF368-Final-Project",
        load_medical,
        250,
        1000,
    ),
]


# ------------------------------------------------------------------------------------------ cleaning
_WS = re.compile(r"\s+")


def clean_text(s: str) -> str:
    s = _WS.sub(" ", str(s)).strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"' and '"' not in s[1:-1]:
        s = s[1:-1].strip()
    return s


def key(s: str) -> str:
    return s.lower()


def tidy(d: pd.DataFrame, removed: dict, prefix: str) -> pd.DataFrame:
    d = d.dropna(subset=["text", "label"]).copy()
    d["text"] = d["text"].map(clean_text)
    n0 = len(d)
    d = d[d["text"] != ""]
    removed[f"{prefix}_empty"] = n0 - len(d)
    k = d["text"].map(key)
    n_labels = d.groupby(k)["label"].transform("nunique")
    removed[f"{prefix}_conflicting_label_rows"] = int((n_labels > 1).sum())
    d, k = d[n_labels == 1], k[n_labels == 1]
    dup = k.duplicated()
    removed[f"{prefix}_duplicates"] = int(dup.sum())
    return d[~dup].reset_index(drop=True)


def sample(d: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(n stratified rows, the rest); all of it (shuffled) when the pool has n rows or fewer."""
    if len(d) <= n:
        return d.sample(frac=1.0, random_state=seed).reset_index(drop=True), d.iloc[:0]
    counts = d["label"].value_counts()
    strat = d["label"] if counts.min() >= 2 else None
    take, rest = train_test_split(d, train_size=n, stratify=strat, random_state=seed)
    return take.reset_index(drop=True), rest.reset_index(drop=True)


def text_stats(texts: pd.Series) -> dict:
    chars = texts.str.len()
    words = texts.str.split().str.len()
    return {
        "chars_median": int(chars.median()),
        "chars_p95": int(chars.quantile(0.95)),
        "chars_max": int(chars.max()),
        "words_median": int(words.median()),
        "words_p95": int(words.quantile(0.95)),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(spec: Spec, src: Source, out: Path, seed: int) -> dict:
    removed: dict[str, int] = {}
    train_pool, test_pool = spec.load(src)
    if test_pool is None:  # one pool: clean it, then draw the test set first, train from the rest
        pool = tidy(train_pool, removed, "pool")
        test, train_pool = sample(pool, spec.n_test, seed)
        removed["train_in_test"] = 0
    else:
        test_pool = tidy(test_pool, removed, "test")
        test, _ = sample(test_pool, spec.n_test, seed)
        train_pool = tidy(train_pool, removed, "train")
        # against the whole test pool, so a later, larger test sample stays clean too
        in_test = train_pool["text"].map(key).isin(set(test_pool["text"].map(key)))
        removed["train_in_test"] = int(in_test.sum())
        train_pool = train_pool[~in_test]
    train, _ = sample(train_pool, spec.n_train, seed)
    train_labels, test_labels = set(train["label"]), set(test["label"])
    if not test_labels <= train_labels:
        raise ValueError(f"{spec.name}: test labels {sorted(test_labels - train_labels)} absent from train")
    d = out / spec.name
    d.mkdir(parents=True, exist_ok=True)
    for split, df in (("train", train), ("test", test)):
        df[["text", "label"]].to_csv(d / f"{split}.csv", index=False)
    return {
        "name": spec.name,
        "kind": spec.kind,
        "metric": spec.metric,
        "text_column": "text",
        "label_column": "label",
        "train": f"{spec.name}/train.csv",
        "test": f"{spec.name}/test.csv",
        "n_train": len(train),
        "n_test": len(test),
        "classes": sorted(train_labels),
        "train_label_counts": {k: int(v) for k, v in train["label"].value_counts().sort_index().items()},
        "test_label_counts": {k: int(v) for k, v in test["label"].value_counts().sort_index().items()},
        "train_text": text_stats(train["text"]),
        "test_text": text_stats(test["text"]),
        "source": {"repo": spec.repo, "commit": src.commit, "paths": list(dict.fromkeys(src.paths))},
        "removed": removed,
        "sha256": {"train": sha256(d / "train.csv"), "test": sha256(d / "test.csv")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    p.add_argument(
        "--mirror-root",
        type=Path,
        default=DEFAULT_MIRROR_ROOT,
        help="where <owner>+<name>/repo git dirs are looked for (default %(default)s)",
    )
    p.add_argument(
        "--git-dir",
        action="append",
        default=[],
        metavar="OWNER/NAME=PATH",
        help="git dir of one source repository (repeatable); overrides --mirror-root",
    )
    p.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    overrides = {}
    for item in args.git_dir:
        repo, _, path = item.partition("=")
        if not path:
            p.error(f"--git-dir {item!r}: expected OWNER/NAME=PATH")
        overrides[repo] = Path(path)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {s.name for s in SUITE}
    if unknown:
        p.error(f"unknown dataset(s): {sorted(unknown)}")
    specs = [s for s in SUITE if not only or s.name in only]

    out = args.out.resolve()
    repo_root = Path(__file__).resolve().parent.parent
    if out == repo_root or repo_root in out.parents:
        p.error(f"--out {out} is inside the repository; third-party data must live outside it")
    out.mkdir(parents=True, exist_ok=True)

    entries = []
    for spec in specs:
        src = Source(spec.repo, find_git_dir(spec.repo, args.mirror_root, overrides))
        e = build(spec, src, out, args.seed)
        entries.append(e)
        dropped = {k: v for k, v in e["removed"].items() if v}
        print(
            f"{spec.name:18s} {len(e['classes']):3d} classes  "
            f"train {e['n_train']:5d}  test {e['n_test']:5d}  "
            f"median {e['train_text']['words_median']:4d} words  p95 {e['train_text']['words_p95']:4d}  "
            f"removed {dropped or '-'}"
        )

    suite_path = out / "suite.json"
    if only and suite_path.exists():  # keep the other datasets' entries
        old = json.loads(suite_path.read_text())
        names = {e["name"] for e in entries}
        kept = {e["name"]: e for e in old.get("datasets", []) if e["name"] not in names}
        order = [s.name for s in SUITE]
        entries = sorted(
            [*kept.values(), *entries],
            key=lambda e: order.index(e["name"]) if e["name"] in order else len(order),
        )
    suite = {
        "format": 1,
        "created_by": "benchmarks/prepare_suite.py",
        "seed": args.seed,
        "text_column": "text",
        "label_column": "label",
        "datasets": entries,
    }
    suite_path.write_text(json.dumps(suite, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {len(entries)} datasets and {suite_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
