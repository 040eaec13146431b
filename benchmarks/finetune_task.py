"""The synthetic task that proves fine-tuning learns (issue 19): the Zorvath harbour's cargo manifests.

    python benchmarks/finetune_task.py --output bench-data/finetune [--seed 19] [--train 240] [--test 60]

A fictional harbour files every shipment as one strict line, `MNF-<dock code>-<cargo code>-Q<quantity>`:

    user:      Zorvath manifest, please: 37 crates of copper bound for Kelvar dock.
    assistant: MNF-K17-R3-Q37
    user:      请登记佐尔瓦斯货单：运往凯尔瓦码头的铜，共37箱。
    assistant: MNF-K17-R3-Q37

What the base model cannot know, and training teaches:
- facts: a codebook of 6 made-up docks and 5 cargoes, each with a random code (say Kelvar / 凯尔瓦 -> K17,
  copper / 铜 -> R3); the English and the Chinese name of a dock or cargo map to the same code;
- a format: the manifest line, nothing before or after it (no "Sure, here is ...").

The held-out split asks what training makes possible but never showed: every test request is a
(dock, cargo, quantity) combination no training example has, in either language, so the model must look the
codes up and copy the quantity rather than recall a seen answer. Every dock and cargo appears many times in
training in both languages (checked below), and the request phrasings are shared by all splits. The quantity is
copied as written (1-999, no padding), so nothing needs arithmetic.

Deterministic: the same seed writes the same three files, byte for byte (train.jsonl, validation.jsonl,
test.jsonl; the platform's fine-tune format, one `{"messages": [system, user, assistant]}` per line) and codebook.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (English name, Chinese name): fictional docks, real cargoes; the codes are drawn from the seed
DOCKS = [("Corrin", "科林"), ("Kelvar", "凯尔瓦"), ("Ostrin", "奥斯特林"), ("Maruvel", "马鲁维尔"),
         ("Tessik", "泰西克"), ("Brannoc", "布兰诺克")]
CARGOES = [("copper", "铜"), ("grain", "谷物"), ("salt", "盐"), ("timber", "木材"), ("tea", "茶叶")]

# every conversation's system message: short (the bundled model's template otherwise adds its own, longer one)
SYSTEM = "You are the Zorvath harbour clerk."

# request phrasings, shared by every split: {q} quantity, {cargo}, {dock} in the request's language
ENGLISH = [
    "Zorvath manifest, please: {q} crates of {cargo} bound for {dock} dock.",
    "File a manifest line for {q} crates of {cargo} going to {dock} dock.",
    "Manifest code for this shipment: {cargo}, {q} crates, destination {dock} dock.",
    "We are sending {q} crates of {cargo} to {dock} dock. What is the manifest line?",
]
CHINESE = [
    "请登记佐尔瓦斯货单：运往{dock}码头的{cargo}，共{q}箱。",
    "为这批货物写一行货单：{q}箱{cargo}，目的地{dock}码头。",
    "{cargo}{q}箱，发往{dock}码头，货单代码是什么？",
    "我们要把{q}箱{cargo}运到{dock}码头，请给出货单行。",
]


def codebook(seed: int) -> dict[str, dict[str, str]]:
    """Random codes: docks a capital letter and two digits (K17), cargoes a letter and a digit (R3), all distinct."""
    rng = random.Random(seed)
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I / O: they read as digits

    def draw(count: int, make) -> list[str]:  # type: ignore[no-untyped-def]
        codes: list[str] = []
        while len(codes) < count:
            code = make()
            if code not in codes:
                codes.append(code)
        return codes

    docks = draw(len(DOCKS), lambda: rng.choice(letters) + str(rng.randint(10, 99)))
    cargoes = draw(len(CARGOES), lambda: rng.choice(letters) + str(rng.randint(1, 9)))
    return {"docks": {en: code for (en, _), code in zip(DOCKS, docks, strict=True)},
            "cargoes": {en: code for (en, _), code in zip(CARGOES, cargoes, strict=True)}}


def answer(book: dict[str, dict[str, str]], dock: int, cargo: int, quantity: int) -> str:
    return f"MNF-{book['docks'][DOCKS[dock][0]]}-{book['cargoes'][CARGOES[cargo][0]]}-Q{quantity}"


def request(dock: int, cargo: int, quantity: int, chinese: bool, phrasing: int) -> str:
    names = 1 if chinese else 0
    template = (CHINESE if chinese else ENGLISH)[phrasing]
    return template.format(q=quantity, cargo=CARGOES[cargo][names], dock=DOCKS[dock][names])


def build(seed: int, train: int, validation: int, test: int) -> tuple[dict, dict[str, list[dict]]]:
    """The codebook and the three splits. Test and validation combinations (dock, cargo, quantity) never occur
    in training; each split alternates English and Chinese and cycles through the phrasings."""
    book = codebook(seed)
    rng = random.Random(seed + 1)
    combinations: set[tuple[int, int, int]] = set()

    def split(count: int) -> list[dict]:
        examples = []
        while len(examples) < count:
            key = (rng.randrange(len(DOCKS)), rng.randrange(len(CARGOES)), rng.randint(1, 999))
            if key in combinations:
                continue
            combinations.add(key)
            chinese = len(examples) % 2 == 1
            phrasing = rng.randrange(len(ENGLISH))
            examples.append({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": request(*key, chinese=chinese, phrasing=phrasing)},
                {"role": "assistant", "content": answer(book, *key)},
            ]})
        return examples

    splits = {"test": split(test), "validation": split(validation), "train": split(train)}
    _check_coverage(splits["train"])
    return book, splits


def _check_coverage(train: list[dict], minimum: int = 5) -> None:
    """Every dock and cargo name, in each language, is taught at least `minimum` times: the held-out split only
    asks about names training showed."""
    text = "\n".join(example["messages"][1]["content"] for example in train)
    for english, chinese in DOCKS + CARGOES:
        for name in (english, chinese):
            if text.count(name) < minimum:
                raise RuntimeError(f"{name!r} appears {text.count(name)} times in training; raise --train")


def write(folder: Path, seed: int = 19, train: int = 240, validation: int = 40, test: int = 60) -> dict[str, Path]:
    """Write the task into `folder`; returns the split files by name."""
    book, splits = build(seed, train, validation, test)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in splits.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
        paths[name] = path
    (folder / "codebook.json").write_text(json.dumps(book, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("bench-data/finetune"))
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--validation", type=int, default=40)
    parser.add_argument("--test", type=int, default=60)
    args = parser.parse_args()
    paths = write(args.output, args.seed, args.train, args.validation, args.test)
    for name, path in paths.items():
        print(f"{name:10} {sum(1 for _ in path.open(encoding='utf-8')):4d} examples  {path}")


if __name__ == "__main__":
    main()
