"""Preference pairs: each format split exactly, every bad row reported by its number, a reproducible held-out split."""

import json
from pathlib import Path

import pandas as pd
import pytest
from support import hh_rlhf_pair_rows, write_in_each_form

from components.config import PreferenceDataConfig
from components.data.prompts import DataError
from components.data.preferences import PreferencePair, drop_too_long, load_pairs, split_pairs

FIXTURES = Path(__file__).parents[1] / "fixtures"
PAIRS = FIXTURES / "preferences"


def config(source, **settings) -> PreferenceDataConfig:
    return PreferenceDataConfig(source=str(source), check_dvc=False, **settings)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# --- implicit: hh-rlhf transcripts --------------------------------------------------------------


def test_hh_rlhf_transcripts_split_at_the_last_shared_assistant_turn():
    loaded = load_pairs(config(PAIRS / "hh-rlhf.jsonl", format="implicit"))
    got = [(pair.prompt, pair.chosen, pair.rejected) for pair in loaded.pairs]
    assert got == [
        (
            "\n\nHuman: How do I boil an egg?\n\nAssistant:",
            " Put it in boiling water for eight minutes, then cool it in cold water.",
            " Put it in the microwave.",
        ),
        (
            (
                "\n\nHuman: Can you recommend a film for a quiet evening?\n\nAssistant: What kind of films do you "
                "usually like?\n\nHuman: Gentle stories, nothing violent.\n\nAssistant:"
            ),
            " You might enjoy 'Paterson': a bus driver who writes poems.",
            " Watch whatever, they're all the same.",
        ),
        (
            (
                "\n\nHuman: What's a good first programming language?\n\nAssistant: Python is a common choice."
                "\n\nHuman: Why?\n\nAssistant: It reads almost like English.\n\nHuman: Is it fast?\n\nAssistant:"
            ),
            " Fast enough for most scripts; hot loops can use NumPy.",
            " No.",
        ),
        (  # they part at the first answer: the later turns belong to the answers
            "\n\nHuman: Should I tell my friend her cooking is bad?\n\nAssistant:",
            (
                " You could offer kind, specific feedback if she asks.\n\nHuman: She did ask.\n\nAssistant: Then "
                "mention one thing you liked and one thing to try differently."
            ),
            (
                " Yes, tell her it's terrible.\n\nHuman: Isn't that harsh?\n\nAssistant: Honesty matters more than "
                "feelings."
            ),
        ),
    ]
    raw = [json.loads(line) for line in (PAIRS / "hh-rlhf.jsonl").read_text().splitlines()]
    for pair, row in zip(loaded.pairs, raw):
        assert pair.prompt + pair.chosen == row["chosen"]
        assert pair.prompt + pair.rejected == row["rejected"]
    assert [pair.row for pair in loaded.pairs] == [1, 2, 3, 4]
    assert all(pair.margin is None for pair in loaded.pairs)
    assert loaded.files == [PAIRS / "hh-rlhf.jsonl"]
    assert (loaded.report.total, loaded.report.kept) == (4, 4)


def test_hh_rlhf_directory_with_data_dir_and_split_reports_its_bad_rows():
    loaded = load_pairs(config(FIXTURES / "hh-rlhf", data_dir="harmless-base", split="test"))
    assert loaded.format == "implicit"
    assert (loaded.report.total, loaded.report.kept) == (20, 18)
    assert loaded.report.identical == [17]
    assert loaded.report.unsplittable == [18]
    assert all(pair.prompt.endswith("\n\nAssistant:") for pair in loaded.pairs)


def test_implicit_bad_rows_are_reported_by_row(tmp_path):
    good = ("\n\nHuman: Hi\n\nAssistant: Hello!", "\n\nHuman: Hi\n\nAssistant: What?")
    rows = [
        {"chosen": good[0], "rejected": good[1]},  # 1
        {"chosen": good[0], "rejected": good[0]},  # 2 identical
        {"chosen": None, "rejected": good[1]},  # 3 missing
        {"chosen": "", "rejected": good[1]},  # 4 empty
        {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Hey\n\nAssistant: b"},  # 5 part early
        {"chosen": "Paris, of course.", "rejected": "Lyon, of course."},  # 6 not a transcript
        {"chosen": 42, "rejected": good[1]},  # 7 not text
        {"chosen": "Note\n\nAssistant: a", "rejected": "Note\n\nAssistant: b"},  # 8 a cue, but no dialogue before it
        {"chosen": good[1], "rejected": good[0]},  # 9
    ]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    report = loaded.report
    assert loaded.format == "implicit"
    assert [pair.row for pair in loaded.pairs] == [1, 9]
    assert (report.total, report.kept) == (9, 2)
    assert (report.identical, report.empty, report.unsplittable) == ([2], [3, 4, 7], [5, 6, 8])
    summary = report.summary()
    assert "2 of 9 pairs kept" in summary
    assert "row 2: chosen identical to rejected" in summary
    assert "rows 3, 4, 7: empty, missing or not text" in summary
    assert "rows 5, 6, 8: not a prompt and two answers" in summary
    metrics = report.as_metrics()
    assert metrics["data/pairs_total"] == 9 and metrics["data/pairs_kept"] == 2
    assert (metrics["data/bad/identical"], metrics["data/bad/empty"], metrics["data/bad/unsplittable"]) == (1, 3, 3)
    assert report.as_json()["unsplittable"] == [5, 6, 8]


# --- explicit: prompt, chosen, rejected ----------------------------------------------------------

ROWS = [
    {"prompt": "The film was", "chosen": " gripping.", "rejected": " dull.", "margin": 1.5},  # 1
    {"prompt": "The cast was", "chosen": " superb.", "rejected": " superb.", "margin": 1.0},  # 2 identical
    {"prompt": "The plot was", "chosen": None, "rejected": " thin.", "margin": 0.5},  # 3 missing
    {"prompt": "   ", "chosen": " fine.", "rejected": " bad.", "margin": 0.5},  # 4 empty prompt
    {"prompt": "The score was", "chosen": " moving.", "rejected": " loud.", "margin": float("nan")},  # 5 bad margin
    {"prompt": "I watched it and", "chosen": " loved it.", "rejected": " left early.", "margin": 0},  # 6
]


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def explicit_file(request, tmp_path) -> Path:
    path = tmp_path / f"pairs.{request.param}"
    if request.param == "jsonl":
        write_jsonl(path, ROWS)  # NaN is written as NaN, which datasets reads as missing
    elif request.param == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(path)
    return path


def test_explicit_pairs_from_each_file_type_keep_their_texts_and_margins(explicit_file):
    loaded = load_pairs(config(explicit_file, margin_field="margin"))
    assert loaded.format == "explicit"
    assert loaded.pairs == [
        PreferencePair("The film was", " gripping.", " dull.", 1.5, 1),
        PreferencePair("I watched it and", " loved it.", " left early.", 0.0, 6),
    ]
    report = loaded.report
    assert (report.identical, report.empty, report.bad_margin) == ([2], [3, 4], [5])
    assert "row 5: margin missing or not a finite number" in report.summary()
    assert report.as_metrics()["data/bad/bad_margin"] == 1


def test_without_margin_field_the_margin_column_is_ignored(tmp_path):
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", ROWS)))
    assert [(pair.row, pair.margin) for pair in loaded.pairs] == [(1, None), (5, None), (6, None)]


def test_margins_must_be_finite_numbers(tmp_path):
    margins = [1, "2.5", "a lot", True, None, [1], "inf", -0.5]
    rows = [{"prompt": "It was", "chosen": " good.", "rejected": " bad.", "margin": m} for m in margins]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows), margin_field="margin"))
    assert [(pair.row, pair.margin) for pair in loaded.pairs] == [(1, 1.0), (2, 2.5), (8, -0.5)]
    assert loaded.report.bad_margin == [3, 4, 5, 6, 7]


def test_an_empty_answer_is_an_answer_but_an_empty_prompt_is_not(tmp_path):
    rows = [
        {"prompt": "The film was", "chosen": " fine.", "rejected": ""},
        {"prompt": "", "chosen": " fine.", "rejected": " bad."},
        {"prompt": "The film was", "chosen": "", "rejected": ""},
    ]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert loaded.pairs == [PreferencePair("The film was", " fine.", "", None, 1)]
    assert (loaded.report.empty, loaded.report.identical) == ([2], [3])


def test_max_pairs_counts_only_good_rows(tmp_path):
    rows = [{"prompt": "It was", "chosen": " same.", "rejected": " same."}]
    rows += [{"prompt": f"Film {i} was", "chosen": " good.", "rejected": " bad."} for i in range(2, 5)]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows), max_pairs=2))
    assert [pair.row for pair in loaded.pairs] == [2, 3]
    assert (loaded.report.total, loaded.report.kept, loaded.report.identical) == (4, 2, [1])
    assert "1 good beyond data.max_pairs" in loaded.report.summary()


def test_no_good_row_fails_with_the_summary_listing_ten_rows_and_the_count_of_the_rest(tmp_path):
    rows = [{"prompt": "It was", "chosen": " same.", "rejected": " same."}] * 12
    with pytest.raises(DataError, match=r"rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 2 more: chosen identical to rejected"):
        load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows)))


def test_the_same_rows_in_each_file_form_are_the_same_pairs(tmp_path):
    """Every CSV field is read as the text it is ("NA", "None", "null", "nan", "0", "007" too), as JSONL and Parquet
    keep them; only an empty field is missing, CSV having no other way to say so."""
    rows = hh_rlhf_pair_rows()
    forms = write_in_each_form(rows, tmp_path)
    loaded = {form: load_pairs(config(path, format="explicit", margin_field="margin")) for form, path in forms.items()}
    expected = [PreferencePair(row["prompt"], row["chosen"], row["rejected"], float(row["margin"]), number)
                for number, row in enumerate(rows, start=1)]
    assert {("NA", "None"), ("0", "null"), ("nan", "007")} <= {(pair.chosen, pair.rejected) for pair in expected}
    for form, pairs in loaded.items():
        assert pairs.pairs == expected, form
        assert pairs.report.as_metrics() == loaded["jsonl"].report.as_metrics(), form


# --- conversational: message lists ---------------------------------------------------------------


def test_conversational_with_a_prompt_column():
    loaded = load_pairs(config(PAIRS / "conversational-prompt.jsonl", format="conversational", margin_field="margin"))
    assert loaded.pairs == [
        PreferencePair(
            [message("system", "Answer in one word."), message("user", "The capital of France?")],
            "Paris.", "Lyon.", 2.0, 1,
        ),
        PreferencePair(
            [message("user", "Name a prime."), message("assistant", "Two."), message("user", "Another?")],
            "Three.", "Four.", 0.5, 2,
        ),
    ]


def test_conversational_whole_conversations_share_the_prompt_and_differ_in_the_last_answer():
    loaded = load_pairs(config(PAIRS / "conversational-whole.jsonl", format="conversational"))
    history = [message("user", "Hi!"), message("assistant", "Hello. How can I help?"),
               message("user", "Suggest a name for a cat.")]
    assert loaded.pairs == [
        PreferencePair(history, "Miso.", "Cat.", None, 1),
        PreferencePair([message("user", "2 + 2?")], "4", "5", None, 2),
    ]


def test_conversational_bad_rows_are_reported_by_row(tmp_path):
    ask, other = message("user", "Hi"), message("user", "Hey")
    yes, no = message("assistant", "Hello!"), message("assistant", "Go away.")
    named = {"role": "assistant", "content": "Hello!", "name": "bot"}
    rows = [
        {"chosen": [ask, yes], "rejected": [ask, no]},  # 1
        {"chosen": [ask, yes], "rejected": [ask, yes]},  # 2 identical
        {"chosen": None, "rejected": [ask, no]},  # 3 missing
        {"chosen": [], "rejected": [ask, no]},  # 4 empty
        {"chosen": [ask, yes], "rejected": [other, no]},  # 5 different prompts
        {"chosen": [ask, yes, ask], "rejected": [ask, yes, other]},  # 6 ends with the user
        {"chosen": [yes], "rejected": [no]},  # 7 no prompt at all
        {"chosen": [ask, {"content": "Hello!"}], "rejected": [ask, no]},  # 8 a message without a role
        {"chosen": [ask, yes], "rejected": [ask, named]},  # 9 the same answer
    ]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert loaded.format == "conversational"
    assert loaded.pairs == [PreferencePair([ask], "Hello!", "Go away.", None, 1)]
    report = loaded.report
    assert (report.identical, report.empty, report.unsplittable) == ([2, 9], [3, 4], [5, 6, 7, 8])


# --- format detection, columns, parse errors -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hh-rlhf.jsonl", "implicit"),
        ("conversational-prompt.jsonl", "conversational"),
        ("conversational-whole.jsonl", "conversational"),
    ],
)
def test_auto_detects_the_format_of_each_fixture(source, expected):
    assert load_pairs(config(PAIRS / source)).format == expected


def test_auto_detects_explicit_past_a_missing_first_prompt(tmp_path):
    rows = [{"prompt": prompt, "chosen": " a.", "rejected": " b."} for prompt in (None, "It was")]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert (loaded.format, loaded.report.empty, [pair.row for pair in loaded.pairs]) == ("explicit", [1], [2])


def test_a_wrong_format_reads_as_no_pairs_and_says_which_format_it_tried():
    with pytest.raises(DataError, match=r"read as format implicit.*rows 1, 2: empty, missing or not text"):
        load_pairs(config(PAIRS / "conversational-whole.jsonl", format="implicit"))


@pytest.mark.parametrize(
    ("settings", "key", "column"),
    [
        ({"chosen_field": "better"}, "chosen_field", "better"),
        ({"rejected_field": "worse"}, "rejected_field", "worse"),
        ({"margin_field": "margin"}, "margin_field", "margin"),
        ({"format": "explicit"}, "prompt_field", "prompt"),
    ],
)
def test_a_missing_column_names_the_config_key(settings, key, column):
    expected = rf"data\.{key}: column '{column}' not in .*hh-rlhf\.jsonl \(columns: chosen, rejected\)"
    with pytest.raises(DataError, match=expected):
        load_pairs(config(PAIRS / "hh-rlhf.jsonl", **settings))


def test_an_unparsable_jsonl_line_fails_naming_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "It was", "chosen": " a.", "rejected": " b."}\n{"prompt": "It was", "chosen": \n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_pairs(config(path))


def test_a_relative_source_is_read_from_root(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    loaded = load_pairs(config("pairs.jsonl"), root=tmp_path)
    assert loaded.files == [tmp_path / "pairs.jsonl"]


# --- too long ------------------------------------------------------------------------------------


def words(pair: PreferencePair) -> int:
    return max(len((pair.prompt + pair.chosen).split()), len((pair.prompt + pair.rejected).split()))


def test_drop_too_long_reports_the_rows_over_the_limit_by_their_longer_side(tmp_path):
    rows = [
        {"prompt": "It was", "chosen": " good.", "rejected": " bad."},  # 3 words
        {"prompt": "It was", "chosen": " good.", "rejected": " bad and much too long."},  # 7 words
        {"prompt": "It was", "chosen": " same.", "rejected": " same."},  # identical
        {"prompt": "It was quite", "chosen": " good.", "rejected": " bad."},  # 4 words
    ]
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    fitted = drop_too_long(loaded, words, max_length=4)
    assert [pair.row for pair in fitted.pairs] == [1, 4]
    assert (fitted.report.too_long, fitted.report.identical, fitted.report.kept) == ([2], [3], 2)
    assert fitted.report.as_metrics()["data/bad/too_long"] == 1
    assert "row 2: too long for the model's max_length" in fitted.report.summary()
    assert "2 of 4 pairs kept" in fitted.report.summary()
    assert (fitted.files, fitted.format) == (loaded.files, "explicit")
    # a new PairSet: the loaded one is as it was
    assert ([pair.row for pair in loaded.pairs], loaded.report.too_long, loaded.report.kept) == ([1, 2, 4], [], 3)


def test_drop_too_long_fails_when_no_pair_fits(tmp_path):
    loaded = load_pairs(config(write_jsonl(tmp_path / "pairs.jsonl", ROWS[:1])))
    with pytest.raises(DataError, match=r"no preference pair fits in 2 tokens.*row 1: too long"):
        drop_too_long(loaded, words, max_length=2)


# --- splitting -----------------------------------------------------------------------------------


def numbered(n: int) -> list[PreferencePair]:
    return [PreferencePair(f"p{i}", " a", " b", None, i) for i in range(1, n + 1)]


def rows_of(pairs: list[PreferencePair]) -> list[int]:
    return [pair.row for pair in pairs]


def test_split_is_disjoint_complete_and_sized_by_the_fraction():
    train, held_out = split_pairs(numbered(20), eval_fraction=0.25, seed=0)
    assert (len(train), len(held_out)) == (15, 5)
    assert not set(rows_of(train)) & set(rows_of(held_out))
    assert sorted(rows_of(train) + rows_of(held_out)) == list(range(1, 21))


def test_split_is_reproducible_per_seed_and_the_same_on_every_machine():
    pairs = numbered(20)
    assert split_pairs(pairs, 0.25, seed=0) == split_pairs(pairs, 0.25, seed=0)
    assert rows_of(split_pairs(pairs, 0.25, seed=0)[1]) != rows_of(split_pairs(pairs, 0.25, seed=1)[1])
    # random.Random(seed) is specified to give the same sequence everywhere: pin it
    assert rows_of(split_pairs(pairs, 0.25, seed=0)[1]) == PINNED_SEED_0


PINNED_SEED_0 = [11, 19, 17, 15, 1]


@pytest.mark.parametrize(
    ("n", "fraction", "held_out"), [(2, 0.1, 1), (2, 0.9, 1), (10, 0.1, 1), (10, 0.15, 2), (1000, 0.1, 100)]
)
def test_at_least_one_pair_is_held_out_and_one_kept_for_training(n, fraction, held_out):
    train, held = split_pairs(numbered(n), fraction, seed=3)
    assert (len(train), len(held)) == (n - held_out, held_out)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_pairs_cannot_be_split(n):
    with pytest.raises(DataError, match="at least 2"):
        split_pairs(numbered(n), 0.1, seed=0)


# --- the demo data -------------------------------------------------------------------------------


def test_the_demo_preferences_load_whole_as_explicit_pairs(demo_data_dir):
    from components.demo.domain import NUM_PREFERENCES

    source = demo_data_dir / "preferences.jsonl"
    loaded = load_pairs(config(source))
    raw = [json.loads(line) for line in source.read_text().splitlines()]
    assert loaded.format == "explicit"
    assert (loaded.report.total, loaded.report.kept) == (NUM_PREFERENCES, NUM_PREFERENCES)
    assert loaded.report.summary() == f"{source}: {NUM_PREFERENCES} of {NUM_PREFERENCES} pairs kept"
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in raw
    ]
    assert any("" in (pair.chosen, pair.rejected) for pair in loaded.pairs)  # saying nothing: kept, to be ranked low


def test_shards_split_the_rows_into_disjoint_parts_by_row_number(tmp_path):
    """A reward model and its judge from disjoint parts of one file: data.num_shards 2, shards 0 and 1."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": " good", "rejected": " bad"} for i in range(7)]
    rows[2]["rejected"] = " good"  # row 3: a bad row of shard 0
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second = (load_pairs(PreferenceDataConfig(source=str(path), num_shards=2, shard=k)) for k in (0, 1))
    assert [p.row for p in first.pairs] == [1, 5, 7] and [p.row for p in second.pairs] == [2, 4, 6]
    assert first.report.identical == [3] and first.report.other_shards == 3 and second.report.other_shards == 4
    assert "3 rows in other shards" in first.report.summary() and "beyond" not in first.report.summary()
    assert first.report.as_metrics()["data/rows_other_shards"] == 3.0
    with pytest.raises(ValueError, match="data.shard \\(2\\) must be below data.num_shards \\(2\\)"):
        PreferenceDataConfig(num_shards=2, shard=2)
