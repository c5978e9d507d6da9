import json

import pandas as pd
import pytest

from components.config import DataConfig
from components.data.prompts import DataError, load_prompts, split_prompts

ROWS = [
    {"prompt": "The film was", "id": 0},
    {"prompt": None, "id": 1},
    {"prompt": "   ", "id": 2},
    {"prompt": "x" * 50, "id": 3},
    {"prompt": "I watched it and", "id": 4},
]


def config(source, **settings):
    return DataConfig(source=str(source), max_prompt_chars=40, **settings)


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def prompt_file(request, tmp_path):
    path = tmp_path / f"prompts.{request.param}"
    frame = pd.DataFrame(ROWS)
    if request.param == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    elif request.param == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def test_each_file_type_loads_and_reports_bad_rows(prompt_file):
    loaded = load_prompts(config(prompt_file))
    assert loaded.prompts == ["The film was", "I watched it and"]
    report = loaded.report
    assert (report.total, report.kept) == (5, 2)
    # CSV cannot tell a missing value from an empty one: both are reported, neither is dropped silently.
    # Rows count from 1, the first data row: in a JSONL file, row N is line N.
    assert sorted(report.missing + report.empty) == [2, 3]
    assert report.too_long == [4]
    assert "rows 4" in report.summary()


def test_directory_source_with_split_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "A"}) + "\n" + json.dumps({"text": "B"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "C"}) + "\n")
    loaded = load_prompts(config(tmp_path, prompt_field="text", split="test"))
    assert loaded.prompts == ["C"]


def test_prompt_template_is_applied(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "The film was"}) + "\n")
    loaded = load_prompts(config(path, prompt_template="Review: {prompt}"))
    assert loaded.prompts == ["Review: The film was"]


def test_unparseable_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "no end\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_prompts(config(path))


def test_ragged_csv_names_file_and_line(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text('prompt,id\n"The film",1\n"Too","many",fields\n')
    with pytest.raises(DataError, match=r"broken\.csv:3: 3 fields where the header has 2"):
        load_prompts(config(path))


def test_missing_column_lists_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"data.prompt_field: column 'prompt' not in .* \(columns: text\)"):
        load_prompts(config(path))


def test_missing_file_and_no_usable_rows(tmp_path):
    with pytest.raises(DataError, match="file or directory not found"):
        load_prompts(config(tmp_path / "nope.jsonl"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(config(path))


def test_split_is_seeded_and_disjoint():
    prompts = [f"p{i}" for i in range(20)]
    train, held_out = split_prompts(prompts, eval_size=5, seed=3)
    assert len(held_out) == 5 and len(train) == 15
    assert not set(train) & set(held_out)
    assert split_prompts(prompts, 5, 3) == (train, held_out)
    assert split_prompts(prompts, 5, 4) != (train, held_out)
    with pytest.raises(DataError, match="data.eval_size"):
        split_prompts(prompts, 20, 0)


def test_a_prompt_that_is_not_text_is_counted_by_row_not_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [{"prompt": "The film was"}, {"prompt": 42}, {"prompt": ["a"]}]))
    loaded = load_prompts(config(path))
    assert loaded.prompts == ["The film was"]
    assert loaded.report.not_text == [2, 3] and loaded.report.as_metrics()["data/not_text_prompt"] == 2
    assert "2 left out, prompt is not text: rows 2, 3" in loaded.report.summary()


def test_a_file_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_prompts(config(path))
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.csv:2: not UTF-8 text"):
        load_prompts(config(csv))


def test_an_empty_file_says_it_is_empty(tmp_path):
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("\n")
        with pytest.raises(DataError, match=rf"{name}: the file is empty"):
            load_prompts(config(tmp_path / name))


def test_row_numbers_of_a_broken_line_and_of_a_reported_row_agree(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "c"}\n')
    assert load_prompts(config(path)).report.empty == [2]  # row 2 is line 2
    path.write_text('{"prompt": "a"}\n{"prompt": \n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid JSON"):
        load_prompts(config(path))


@pytest.mark.parametrize("suffix, opener", [(".gz", "gzip"), (".bz2", "bz2"), (".xz", "lzma")])
def test_compressed_jsonl_and_csv_load_like_plain_ones(tmp_path, suffix, opener):
    import importlib

    module = importlib.import_module(opener)
    jsonl = tmp_path / f"prompts.jsonl{suffix}"
    with module.open(jsonl, "wt") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in ROWS))
    assert load_prompts(config(jsonl)).prompts == ["The film was", "I watched it and"]
    csv = tmp_path / f"prompts.csv{suffix}"
    with module.open(csv, "wt") as handle:
        handle.write(pd.DataFrame(ROWS).to_csv(index=False))
    assert load_prompts(config(csv)).prompts == ["The film was", "I watched it and"]
    broken = tmp_path / f"broken.jsonl{suffix}"
    with module.open(broken, "wt") as handle:
        handle.write('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=rf"broken\.jsonl\{suffix}:2: not valid JSON"):
        load_prompts(config(broken))


def test_a_truncated_archive_names_the_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    import gzip

    path.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 100)[:40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot decompress"):
        load_prompts(config(path))


def test_a_hub_dataset_that_cannot_be_reached_is_named_with_its_subset_directory_and_split():
    with pytest.raises(DataError, match=r"data.source: cannot load hub dataset 'Anthropic/hh-rlhf' \(data_dir 'harmless-base', split 'test'\)"):
        load_prompts(DataConfig(source="Anthropic/hh-rlhf", data_dir="harmless-base", split="test"))


def test_a_subset_is_for_hub_datasets_and_a_data_dir_picks_a_local_sub_directory(tmp_path):
    (tmp_path / "harmless-base").mkdir()
    (tmp_path / "harmless-base" / "test.jsonl").write_text(json.dumps({"prompt": "A"}) + "\n")
    (tmp_path / "helpful-base").mkdir()
    (tmp_path / "helpful-base" / "test.jsonl").write_text(json.dumps({"prompt": "B"}) + "\n")
    assert load_prompts(config(tmp_path, data_dir="helpful-base", split="test")).prompts == ["B"]
    with pytest.raises(DataError, match="data.subset names a configuration of a hub dataset"):
        load_prompts(config(tmp_path, subset="default"))
    with pytest.raises(DataError, match="data.data_dir: .*red-team is not a directory"):
        load_prompts(config(tmp_path, data_dir="red-team"))
