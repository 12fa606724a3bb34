"""Frozen outputs of the built-in tasks and of the datamodule's streams.

The shipped tiny models were trained, and their figures measured, on exactly these prompts: a
refactor of the task or data code must not change a single generated prompt, answer, split
membership or RNG draw. The expected values below were recorded by running the code of commit
bc0be88 (before the task and data modules were reorganised); each case pins the first example
literally (its first 60 characters, readable when it fails) and the whole sequence by a CRC-32
of its "prompt<TAB>answer" lines (so a change anywhere in it fails).
"""
from __future__ import annotations

import json
import random
import zlib

import pytest

from lit_covrl.data import PromptDataModule
from lit_covrl.tasks import get_task
from lit_covrl.types import Example


def _lines(examples: list[Example]) -> list[str]:
    return [f"{ex.prompt}\t{ex.answer}" for ex in examples]


def _first(examples: list[Example]) -> str:
    return _lines(examples)[0][:60]


def _crc(examples: list[Example]) -> str:
    text = "\n".join(_lines(examples))
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def _samples(name: str, kwargs: dict, seed: int, n: int) -> list[Example]:
    task, rng = get_task(name, **kwargs), random.Random(seed)
    return [task.sample(rng) for _ in range(n)]


# (task, kwargs, rng seed, n) -> (first example as "prompt<TAB>answer"[:60], CRC-32 of all n)
SAMPLES = [
    (("arithmetic", {}, 0, 500), ("5+33=\t38", "c8bc9e1c")),
    (("arithmetic", {}, 7, 500), ("41+19=\t60", "e714330e")),
    (("arithmetic", {"digits": 3, "num_terms": 4, "ops": "-+-"}, 1, 300),
     ("137+582-867+821=\t673", "6a2bcadd")),
    (("arithmetic", {"split": "test"}, 2, 200), ("7+11=\t18", "d6265dbb")),
    (("arithmetic", {"split": "all", "test_fraction": 0.3, "ops": "-"}, 3, 300), ("30-75=\t-45", "c25d2a11")),
    (("reasoning", {}, 0, 500), ("38+61+45-74=\t38+61=99,99+45=144,144-74=70|70", "4167819c")),
    (("reasoning", {}, 7, 500), ("41+19+50+83=\t41+19=60,60+50=110,110+83=193|193", "ffa02c3d")),
    (("reasoning", {"digits": 1, "num_terms": 6, "ops": "+"}, 1, 300),
     ("2+9+1+4+1+7=\t2+9=11,11+1=12,12+4=16,16+1=17,17+7=24|24", "228ab289")),
    (("reasoning", {"split": "test", "digits": 3}, 2, 200),
     ("4+352-960-630=\t4+352=356,356-960=-604,-604-630=-1234|-1234", "7a1674dd")),
    (("reasoning", {"split": "all", "test_fraction": 0.25}, 3, 300),
     ("30-75-69+16=\t30-75=-45,-45-69=-114,-114+16=-98|-98", "b91b42c4")),
    (("word_problems", {}, 0, 100),
     ("Elena has 4 shells. She trades every shell for 5 new shells.", "10862446")),
    (("word_problems", {"split": "test", "num_steps": 3}, 4, 50),
     ("Mateo has 40 stickers. Then he splits the stickers into 2 eq", "d0ea2737")),
]

# (task, kwargs, n, seed) -> (first, CRC-32) of task.heldout(n, seed)
HELDOUT = [
    (("arithmetic", {}, 64, "lit_covrl:val:0"), ("80+0=\t80", "32752b60")),  # the quickstart's val set
    (("arithmetic", {}, 200, 5), ("23+88=\t111", "d17d4b4d")),
    (("arithmetic", {"digits": 3, "num_terms": 3, "ops": "+-"}, 100, 99), ("424+833+379=\t1636", "651bfd76")),
    # the reasoning config's validation set
    (("reasoning", {}, 128, "lit_covrl:val:0"),
     ("31+22-6-48=\t31+22=53,53-6=47,47-48=-1|-1", "42ed8806")),
    (("reasoning", {"digits": 1, "test_fraction": 0.2}, 50, 9),
     ("4+3-3+6=\t4+3=7,7-3=4,4+6=10|10", "2fd3fe5c")),
]


@pytest.mark.parametrize("case, expected", SAMPLES, ids=[f"{c[0]}-{i}" for i, (c, _) in enumerate(SAMPLES)])
def test_sample_streams_are_unchanged(case, expected):
    examples = _samples(*case)
    assert (_first(examples), _crc(examples)) == expected


@pytest.mark.parametrize("case, expected", HELDOUT, ids=[f"{c[0]}-{i}" for i, (c, _) in enumerate(HELDOUT)])
def test_heldout_sets_are_unchanged(case, expected):
    name, kwargs, n, seed = case
    examples = get_task(name, **kwargs).heldout(n, seed)
    assert len(examples) == n
    assert (_first(examples), _crc(examples)) == expected


def _stream_examples(dm: PromptDataModule, world: int = 2) -> list[Example]:
    """Train batches 0..2 of every rank of `world`, then regen rounds 1 and 2 of batch 1, then the
    held-out set: everything the datamodule draws, in a fixed order."""
    dm.setup("fit")
    batches = [dm.batch_at(k, r, world) for k in range(3) for r in range(world)]
    batches += [dm.regen_batch(1, rnd, 3) for rnd in (1, 2)]
    batches += list(dm.val_dataloader())
    return [Example(p, a) for b in batches for p, a in zip(b.prompts, b.answers)]


@pytest.mark.parametrize("task, kwargs, world, expected", [
    ("arithmetic", {}, 1, ("89+69=\t158", "7d6b4a38")),
    ("reasoning", {}, 1, ("89+69-72+25=\t89+69=158,158-72=86,86+25=111|111", "221ea09d")),
    # no heldout(): the datamodule's fallback
    ("word_problems", {"num_steps": 1}, 1,
     ("Mateo has 38 cookies. He finds 9 more cookies. How many cook", "7822e529")),
    # two ranks: changed on purpose when a task's step got one generator shared by the ranks (so
    # that 2 ranks x B see what 1 rank x 2B sees); were d67bc075, bc0524bc and f9ef2528. One rank's
    # figures above are those of the code before the change.
    ("arithmetic", {}, 2, ("89+69=\t158", "fe81ec39")),
    ("reasoning", {}, 2, ("89+69-72+25=\t89+69=158,158-72=86,86+25=111|111", "1bc525a3")),
    ("word_problems", {"num_steps": 1}, 2,
     ("Mateo has 38 cookies. He finds 9 more cookies. How many cook", "ab60a0c0")),
])
def test_datamodule_task_streams_are_unchanged(task, kwargs, world, expected):
    dm = PromptDataModule(task=task, task_kwargs=kwargs, batch_size=5, val_size=12, val_batch_size=5, seed=3)
    examples = _stream_examples(dm, world)
    assert len(examples) == 3 * world * 5 + 2 * 5 + 12
    assert (_first(examples), _crc(examples)) == expected


def test_datamodule_row_streams_are_unchanged(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(13)))
    val.write_text("".join(json.dumps({"prompt": f"v{i}", "answer": i}) + "\n" for i in range(7)))
    dm = PromptDataModule(task=None, train_files=[str(train)], val_files=[str(val)], batch_size=5,
                          val_batch_size=5, seed=3)
    examples = _stream_examples(dm)  # 30 train + 10 regen positions over 13 rows: 3 epochs
    assert len(examples) == 3 * 2 * 5 + 2 * 5 + 7
    assert (_first(examples), _crc(examples)) == ("q4\t4", "e8fb8a47")
