"""The demo data: reproducible to the byte, pinned by data.dvc, and judged by a gold scorer that
rewards real quality, not reward hacking."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from components.config import PROJECT_ROOT
from components.demo.domain import LABEL_NOISE, NUM_PREFERENCES, NUM_PROMPTS, NUM_SFT, generate_demo_data
from components.demo.gold import gold_score, is_gold_positive, is_well_formed


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    return generate_demo_data(tmp_path_factory.mktemp("demo"), seed=0)


def test_same_seed_gives_byte_identical_files(demo_files, tmp_path):
    again = generate_demo_data(tmp_path / "again", seed=0)
    for name, path in demo_files.items():
        assert again[name].read_bytes() == path.read_bytes(), name


def test_a_different_seed_gives_different_files(demo_files, tmp_path):
    other = generate_demo_data(tmp_path / "other", seed=1)
    for name, path in demo_files.items():
        assert other[name].read_bytes() != path.read_bytes(), name


def test_files_have_the_documented_rows_and_fields(demo_files):
    assert set(demo_files) == {"prompts", "sft", "preferences"}
    prompts, sft, pairs = (read(demo_files[name]) for name in ("prompts", "sft", "preferences"))
    assert (len(prompts), len(sft), len(pairs)) == (NUM_PROMPTS, NUM_SFT, NUM_PREFERENCES)
    assert all(set(row) == {"prompt"} for row in prompts)
    assert all(set(row) == {"text"} for row in sft)
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in pairs)
    assert len({row["prompt"] for row in prompts}) > 1000  # varied, not a handful of openings
    raw = demo_files["sft"].read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")


def test_prompts_are_neutral_openings(demo_files):
    for row in read(demo_files["prompts"]):
        assert not row["prompt"].endswith((".", "!", " ")), row
        assert gold_score(row["prompt"] + ".") in (0.0, -2.0), row  # no sentiment of their own


def test_sft_reviews_are_well_formed_short_and_mostly_not_positive(demo_files):
    texts = [row["text"] for row in read(demo_files["sft"])]
    assert all(is_well_formed(text) for text in texts)
    lengths = sorted(len(text.split()) for text in texts)
    assert 8 <= lengths[len(lengths) // 2] <= 20
    positive_share = sum(map(is_gold_positive, texts)) / len(texts)
    assert 0.25 <= positive_share <= 0.45


def test_preference_labels_follow_the_gold_truth_up_to_the_label_noise(demo_files):
    pairs = read(demo_files["preferences"])
    agree = sum(gold_score(p["prompt"] + p["chosen"]) > gold_score(p["prompt"] + p["rejected"]) for p in pairs) / len(pairs)
    assert abs(agree - (1 - LABEL_NOISE)) < 0.02
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # prompt + completion reads right: a completion starts with a space, or ends the sentence at once
    assert all(c[:1] in ("", " ", ".", "!") for p in pairs for c in (p["chosen"], p["rejected"]))


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("The new thriller was gripping and the acting was superb.", 2 / 3),
        ("I watched this film and loved every minute of it!", 0.5),
        ("The plot was never boring.", 0.5),
        ("The film was okay.", 0.0),
        ("The film was not very good.", -0.5),
        ("The comedy was dull and painful.", -2 / 3),
        ("The plot was stupid but the acting was great.", -1.5),  # rude
        ("The film was great great great great.", -2.0),  # repeated word
        ("The film was great and great and great.", -2.0),  # one praise word over and over
        ("The film was great superb lovely amazing.", -2.0),  # a salad of praise
        ("The film was great. The film was great.", -2.0),  # looped
        ("The new thriller was", -2.0),  # empty completion: no sentence
        ("", -2.0),
        ("xkqz vbnm plrt great.", -2.0),  # garbled
        ("The film was great .", -2.0),  # stray punctuation
    ],
)
def test_gold_score_on_hand_written_reviews(text, score):
    assert gold_score(text) == pytest.approx(score)
    assert is_gold_positive(text) == (score > 0)


def test_gold_scores_a_bare_completion_like_the_whole_review():
    assert is_gold_positive(" gripping and moving.")
    assert gold_score(" dull.") == -2.0  # a single word is not a review


def test_regenerated_demo_data_matches_data_dvc(tmp_path):
    # The pinned data is exactly what the generator writes with the default seed, so a fresh clone
    # can rebuild data/demo without a DVC remote. Checked in a scratch repo: the repo's own data/ is left alone.
    dvc_file = PROJECT_ROOT / "data.dvc"
    if not dvc_file.is_file():
        pytest.fail(f"{dvc_file} is missing: it pins data/demo")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    generate_demo_data(tmp_path / "data" / "demo", seed=0)

    from dvc.repo import Repo

    with Repo(str(tmp_path)) as repo:
        # Without the data in its cache DVC says "not in cache" whether or not the data matches,
        # so cache what was generated first, then judge it against the repo's own data.dvc.
        repo.add(str(tmp_path / "data" / "demo"))
        (tmp_path / "data" / "demo.dvc").unlink()
        shutil.copy(dvc_file, tmp_path / "data.dvc")
        assert repo.status() == {}

        (tmp_path / "data" / "demo" / "prompts.jsonl").write_text('{"prompt": "changed"}\n')
        assert list(repo.status().values()) == [[{"changed outs": {"data/demo": "modified"}}]]


def test_the_annotators_label_a_policys_completions_as_they_labelled_the_demo_pairs():
    from components.demo.annotators import annotate_completions

    prompt = "The new thriller was"
    good, hacked, also_good = " gripping and fun.", " loved loved loved enjoyed I and", " gripping and a lot of fun."
    assert gold_score(prompt + good) - gold_score(prompt + hacked) >= 0.4 > abs(gold_score(prompt + good) - gold_score(prompt + also_good))
    n = 2000
    annotated = annotate_completions([prompt] * (n + 1), [hacked] * n + [good], [good] * n + [also_good], seed=0)
    assert annotated.sampled == n + 1 and annotated.near_ties == 1  # the last two: a near-tie, left unlabelled
    assert len(annotated.pairs) == n and all(pair["prompt"] == prompt for pair in annotated.pairs)
    flipped = sum(pair["chosen"] == hacked for pair in annotated.pairs)
    assert annotated.policy_chosen == flipped and abs(flipped / n - LABEL_NOISE) < 0.02  # the noise of the demo's labels
    again = annotate_completions([prompt] * (n + 1), [hacked] * n + [good], [good] * n + [also_good], seed=0)
    assert again == annotated
