"""Every dataset is versioned on its own: the md5 of the bytes a run reads, and the .dvc file that pins it; the fix
suggested for a mismatch fits the situation and never deletes the user's files."""

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from components.config import PROJECT_ROOT, DataConfig
from components.data.prompts import DataError
from components.data.versioning import dataset_version, file_md5


@pytest.fixture
def project(tmp_path) -> Path:
    """A DVC project of its own (git and DVC initialised), as a team's checkout of alignflow is."""
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    (tmp_path / "data").mkdir()
    return tmp_path


def dvc_add(project: Path, target: str) -> None:
    """`dvc add TARGET` in the project, through DVC's Python API (the command line's own)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        repo.add(str(project / target))


def write(path: Path, rows) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_untracked_dataset_is_refused_naming_the_dvc_add_to_run_unless_unchecked(project):
    path = write(project / "data" / "reviews.jsonl.gz", [{"prompt": "The film was"}])
    with pytest.raises(DataError, match=r"data.source: data/reviews.jsonl.gz is not tracked by DVC. Version it: "
                                        r"`dvc add data/reviews.jsonl.gz`, then `git add data/reviews.jsonl.gz.dvc`"):
        dataset_version(DataConfig(source="data/reviews.jsonl.gz"), project)
    unchecked = dataset_version(DataConfig(source="data/reviews.jsonl.gz", check_dvc=False), project)
    assert (unchecked.md5, unchecked.versioned, unchecked.dvc_file) == (file_md5(path), False, None)
    assert unchecked.as_tags()["alignflow.data_versioned"] == "false"


def test_a_tracked_dataset_is_identified_by_its_own_dvc_file_and_the_md5_of_its_bytes(project):
    path = write(project / "data" / "reviews.jsonl.gz", [{"prompt": "The film was"}])
    other = write(project / "data" / "other.jsonl.gz", [{"prompt": "A different set"}])
    dvc_add(project, "data/reviews.jsonl.gz")
    dvc_add(project, "data/other.jsonl.gz")
    version = dataset_version(DataConfig(source="data/reviews.jsonl.gz"), project)
    assert (version.name, version.md5, version.dvc_file) == ("reviews", file_md5(path), "data/reviews.jsonl.gz.dvc")
    assert version.versioned and version.dvc_md5 == file_md5(path)  # what dvc add records for a file
    # another dataset changing does not touch this one's version
    write(other, [{"prompt": "changed"}])
    assert dataset_version(DataConfig(source="data/reviews.jsonl.gz"), project) == version


def test_a_changed_dataset_gets_both_fixes_and_none_that_deletes_it(project):
    path = write(project / "data" / "reviews.jsonl.gz", [{"prompt": "The film was"}])
    dvc_add(project, "data/reviews.jsonl.gz")
    write(path, [{"prompt": "The film was"}, {"prompt": "A new row"}])
    with pytest.raises(DataError) as refused:
        dataset_version(DataConfig(source="data/reviews.jsonl.gz"), project)
    message = str(refused.value)
    assert "data/reviews.jsonl.gz does not match data/reviews.jsonl.gz.dvc" in message
    assert "record the new version: `dvc add data/reviews.jsonl.gz`, then commit data/reviews.jsonl.gz.dvc" in message
    assert "first move your changed copy out of data/reviews.jsonl.gz, then `dvc pull data/reviews.jsonl.gz.dvc`" in message
    assert "checkout" not in message and "--force" not in message and "demo" not in message
    dvc_add(project, "data/reviews.jsonl.gz")  # the user records the new version
    assert dataset_version(DataConfig(source="data/reviews.jsonl.gz"), project).md5 == file_md5(path)


def test_a_missing_dataset_points_at_its_dvc_file(project):
    path = write(project / "data" / "reviews.jsonl.gz", [{"prompt": "The film was"}])
    dvc_add(project, "data/reviews.jsonl.gz")
    path.unlink()
    with pytest.raises(DataError, match=r"file or directory not found: .*reviews.jsonl.gz; `dvc pull data/reviews.jsonl.gz.dvc`"):
        dataset_version(DataConfig(source="data/reviews.jsonl.gz"), project)


def test_a_file_of_a_tracked_directory_is_versioned_by_its_own_bytes(project):
    (project / "data" / "corpus").mkdir()
    first = write(project / "data" / "corpus" / "a.jsonl.gz", [{"prompt": "A"}])
    write(project / "data" / "corpus" / "b.jsonl.gz", [{"prompt": "B"}])
    dvc_add(project, "data/corpus")
    version = dataset_version(DataConfig(source="data/corpus/a.jsonl.gz"), project)
    assert (version.md5, version.dvc_file, version.name) == (file_md5(first), "data/corpus.dvc", "a")
    assert version.dvc_md5.endswith(".dir")


def test_data_outside_the_project_is_refused_saying_how_to_bring_it_in(project, tmp_path_factory):
    outside = write(tmp_path_factory.mktemp("elsewhere") / "mine.jsonl.gz", [{"prompt": "x"}])
    with pytest.raises(DataError, match=r"is outside this DVC project .*copy it under data/ and run `dvc add data/mine.jsonl.gz`"):
        dataset_version(DataConfig(source=str(outside)), project)


def test_the_demo_data_is_pinned_by_data_dvc_and_its_fix_is_to_regenerate_it(demo_data_dir):
    version = dataset_version(DataConfig(source="data/demo/prompts.jsonl"), PROJECT_ROOT)
    assert (version.dvc_file, version.name) == ("data.dvc", "prompts")
    assert version.md5 == file_md5(PROJECT_ROOT / "data" / "demo" / "prompts.jsonl")
    with pytest.raises(DataError, match="hub dataset 'Anthropic/hh-rlhf' is not versioned by DVC"):
        dataset_version(DataConfig(source="Anthropic/hh-rlhf"), PROJECT_ROOT)
