"""Text corpora: documents with ids, tokenised and packed into fixed-length windows.

Corpus specs (``iter_documents(spec)``):

- ``builtin`` — real English/technical text that needs no network: the docstrings of the Python
  standard library of this interpreter, read with ``ast`` (one document per module file: its
  module, class and function docstrings in source order, joined by blank lines; the stdlib folder
  is walked in sorted order, skipping tests, idlelib, turtledemo, ensurepip, lib2to3,
  site-packages and pydoc_data), followed by the ``pydoc_data.topics`` help topics (one document
  each, sorted by name). Deterministic for a given Python version (~2M characters, ~0.5M tokens).
- ``calendar`` — SYNTHETIC probe text, generated (deterministic, no network): 600 documents of 8
  template sentences about weekdays, months and years ("Two days from Monday is Wednesday.", "She was
  born in March 1987."), ~60k tokens; for looking for the weekday / month circles of Engels et al. 2024
  (``workbench multid``). Not natural text: mix it with ``builtin`` stores for anything else.
- ``SPEC*N`` (e.g. ``builtin*4``) — any of these N times over, as epochs: the same documents with
  the same ids each time (so the held-out split holds a document out of every epoch). For runs
  longer than a small corpus; say so when reporting (the rows repeat).
- ``PATH.txt`` — one document (the whole file); ``PATH.txt:lines`` — one document per non-empty
  line; ``PATH.txt:paragraphs`` — one per blank-line-separated paragraph.
- ``FOLDER[:field]`` — every ``*.txt`` / ``*.md`` / ``*.jsonl`` file below it, sorted by path: a
  text file is one document, a ``.jsonl`` file one document per line (text in ``field``, default
  ``text``).
- ``PATH.jsonl[:field]`` — one document per line, text in ``field`` (default ``text``).

Streaming: nothing reads a whole corpus. Files are opened one at a time as documents are asked
for, ``.jsonl`` and ``:lines`` / ``:paragraphs`` files line by line, ``hf:`` with
``datasets(streaming=True)``. A text file larger than ``BIG_FILE`` bytes (8 MiB) is one document
whose text is never held whole: ``Document.text`` is empty and ``Document.pieces()`` yields it in
pieces of about ``PIECE_CHARS`` characters (1 Mi), each cut between a letter and the whitespace
after it (a line end preferred; anywhere only in 2 Mi characters without one), and ``pack``
tokenises it piece by piece. Byte-level BPE (GPT-2, Llama 3, SmolLM2) and WordPiece (BERT)
pre-tokenisers split there anyway, so the tokens equal those of the whole text (tested);
SentencePiece tokenizers that add a dummy prefix space may differ at the cuts.
- ``hf:NAME[:split[:field]]`` — a Hugging Face dataset (split ``train``, field ``text`` by
  default), streamed with ``datasets``; needs the network (or ``HF_DATASETS_OFFLINE=1`` and a
  cached copy). Offline it fails at once with a clear message.

Document ids are 0, 1, 2, ... in the order documents are produced (empty documents are skipped
and get no id).

Packing policy (``pack``): **one document per window, windows never span documents**, so every
sequence has exactly one document id (``store.sequences()["doc_ids"]``) and document-level
pooling is a group-by on ``doc_ids[seq_index]``. Each document is tokenised without special
tokens, cut into consecutive chunks of ``seq_len - n_special`` tokens, and each chunk is wrapped
with the tokenizer's own special tokens (BOS for Llama-style tokenizers that add one, [CLS] ...
[SEP] for BERT); a document's last chunk is shorter and is right-padded when batched. The
builtin corpus uses whole modules as documents, so few windows are short.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import socket
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import NotFound, WorkbenchError

SPEC_HELP = ("a corpus is 'builtin', 'calendar' (synthetic weekday/month/year sentences), a .txt file "
             "(optionally :lines or :paragraphs), a folder of "
             ".txt/.md files, FILE.jsonl[:field], or hf:NAME[:split[:field]]; SPEC*N repeats it N times (epochs)")

_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "ensurepip", "lib2to3", "site-packages",
              "dist-packages", "__pycache__", "pydoc_data", "__phello__"}


@dataclass
class Document:
    """One document. ``pieces``: set for files over ``BIG_FILE`` bytes, whose ``text`` is ''
    and whose text comes in pieces (see the module docstring)."""
    id: int
    name: str
    text: str
    pieces: Callable[[], Iterator[str]] | None = field(default=None, repr=False, compare=False)


@dataclass
class Window:
    """One packed sequence: token ids including special tokens (unpadded) and its document.
    ``char_end``: per token, the character of the document where it ends (-1 for special
    tokens); None when the tokenizer gives no offsets (slow tokenizers)."""
    doc_id: int
    ids: list[int]
    char_end: list[int] | None = None


# ------------------------------------------------------------------------------- documents
def iter_documents(spec: str) -> Iterator[Document]:
    """Documents of a corpus spec, with ids 0.. in order. Raises at once for a bad spec or a
    missing file (before yielding anything). ``SPEC*N``: the corpus N times over (epochs), each
    epoch with the same document ids, so a held-out document stays held out in every epoch."""
    base, epochs = split_epochs(spec)
    source = _source(base)   # validates eagerly
    if epochs == 1:
        return _number(source)
    return _epochs(base, source, epochs)


def split_epochs(spec: str) -> tuple[str, int]:
    """``("builtin", 4)`` for ``"builtin*4"``; ``(spec, 1)`` without a ``*N`` suffix."""
    if isinstance(spec, str) and (m := re.fullmatch(r"(.+?)\*(\d+)", spec.strip())) and \
            not Path(spec.strip()).exists():
        n = int(m.group(2))
        if n < 1:
            raise WorkbenchError(f"corpus {spec!r}: the repeat count after '*' must be >= 1")
        return m.group(1), n
    return spec, 1


def _epochs(base: str, first: Iterator, epochs: int) -> Iterator[Document]:
    yield from _number(first)
    for _ in range(epochs - 1):
        yield from _number(_source(base))


def _number(texts: Iterable[tuple[str, Any]]) -> Iterator[Document]:
    i = 0
    for name, text in texts:
        if isinstance(text, _BigFile):
            if text.has_text():
                yield Document(i, name, "", pieces=text.pieces)
                i += 1
        elif text and text.strip():
            yield Document(i, name, text)
            i += 1


def _source(spec: str) -> Iterator[tuple[str, str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise WorkbenchError(f"empty corpus spec; {SPEC_HELP}")
    spec = spec.strip()
    if spec == "builtin":
        return _builtin_cached()
    if spec == "calendar":
        return _calendar()
    if spec.startswith("hf:"):
        return _hf(spec)
    path, mode = spec, None
    if not Path(spec).exists() and ":" in spec:
        path, mode = spec.rsplit(":", 1)
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFound(f"corpus not found: {path} (no such file or folder); {SPEC_HELP}")
    if p.is_dir():
        files = _folder_files(p)
        if not files:
            raise WorkbenchError(f"corpus folder {p} has no .txt, .md or .jsonl files")
        if mode and not any(f.suffix.lower() == ".jsonl" for f in files):
            raise WorkbenchError(f"corpus {spec!r}: a folder's ':{mode}' suffix names the text field "
                                 f"of its .jsonl files, and {p} has none")
        return _folder(p, files, mode or "text")
    if p.suffix.lower() == ".jsonl":
        return _jsonl(p, mode or "text")
    if mode not in (None, "lines", "paragraphs"):
        raise WorkbenchError(f"corpus {spec!r}: unknown text mode {mode!r}; use :lines or :paragraphs")
    return _text_file(p, mode)


def corpus_fingerprint(spec: str) -> dict[str, Any]:
    """What identifies a corpus for resuming and provenance: the spec plus, for files, their size
    and modification time; for builtin, the Python version whose stdlib it reads."""
    fp: dict[str, Any] = {"spec": spec}
    spec, epochs = split_epochs(spec)
    if epochs > 1:
        fp["epochs"] = epochs
    if spec == "builtin":
        fp["python"] = sys.version.split()[0]
    elif spec == "calendar":
        fp["generator"] = CALENDAR_VERSION
    elif not spec.startswith("hf:"):
        path = spec if Path(spec).exists() or ":" not in spec else spec.rsplit(":", 1)[0]
        p = Path(path).expanduser()
        if p.is_file():
            st = p.stat()
            fp.update(bytes=st.st_size, mtime=int(st.st_mtime))
        elif p.is_dir():
            files = _folder_files(p)
            fp.update(files=len(files), bytes=sum(f.stat().st_size for f in files),
                      mtime=max((int(f.stat().st_mtime) for f in files), default=0))
    return fp


BIG_FILE = 8 << 20          # bytes: a text file above this is one document read in pieces
PIECE_CHARS = 1 << 20       # characters per piece of such a file (and per read of :lines files)
_FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")
# what str.splitlines() splits on (after universal-newline decoding, which turns \r\n, \r into \n)
_LINE_ENDS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _folder_files(p: Path) -> list[Path]:
    return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _FOLDER_SUFFIXES)


def _folder(root: Path, files: list[Path], field: str) -> Iterator[tuple[str, Any]]:
    """A folder's documents, opening one file at a time."""
    for f in files:
        name = f.relative_to(root).as_posix()
        if f.suffix.lower() == ".jsonl":
            yield from _jsonl(f, field, label=name)
        else:
            yield from _text_file(f, None, label=name)


def _open_text(p: Path):
    return open(p, encoding="utf-8", errors="replace")     # universal newlines, as read_text


def _read_text(p: Path) -> str:
    with _open_text(p) as f:
        return f.read()


class _BigFile:
    """A text file over BIG_FILE bytes: one document, read in pieces when it is packed."""

    def __init__(self, path: Path):
        self.path = path

    def has_text(self) -> bool:
        return any(piece.strip() for piece in self.pieces())

    def pieces(self) -> Iterator[str]:
        """The text in pieces of about PIECE_CHARS, cut where tokenizers split anyway."""
        with _open_text(self.path) as f:
            carry = ""
            while True:
                chunk = f.read(PIECE_CHARS)
                text = carry + chunk
                if not chunk:
                    if text:
                        yield text
                    return
                cut = _cut(text)
                if cut <= 0:
                    carry = text
                    continue
                yield text[:cut]
                carry = text[cut:]


# a letter followed by a line end / by any whitespace: no pre-tokeniser regex of GPT-2, Llama 3
# (SmolLM2) or BERT puts both in one pre-token, and none looks back across it
_CUT_LINE = re.compile(r"(?<=[^\W\d_])(?=[\r\n])")
_CUT_SPACE = re.compile(r"(?<=[^\W\d_])(?=\s)")


def _cut(text: str) -> int:
    """Where to end a piece of `text`: at the last letter followed by a line end in its second
    half; else the last letter followed by whitespace; else (no such place) at the end once the
    text is two pieces long. 0: no cut yet (read more first)."""
    lo = len(text) // 2
    for pattern in (_CUT_LINE, _CUT_SPACE):
        last = None
        for m in pattern.finditer(text, lo):
            last = m
        if last is not None:
            return last.start()
    return len(text) if len(text) >= 2 * PIECE_CHARS else 0


def _lines(p: Path) -> Iterator[str]:
    """The lines of a text file as ``str.splitlines()`` gives them, read PIECE_CHARS at a time."""
    with _open_text(p) as f:
        carry = ""
        while True:
            chunk = f.read(PIECE_CHARS)
            if not chunk:
                break
            parts = (carry + chunk).splitlines(keepends=True)
            carry = parts.pop()      # may be incomplete: joined with the next chunk
            for line in parts:
                yield line[:-1]      # one end character (no \r\n left after decoding)
        if carry:
            yield carry[:-1] if carry[-1] in _LINE_ENDS else carry


def _text_file(p: Path, mode: str | None, label: str | None = None) -> Iterator[tuple[str, Any]]:
    label = label or p.name
    if mode is None:
        yield label, (_BigFile(p) if p.stat().st_size > BIG_FILE else _read_text(p))
    elif mode == "lines":
        for i, line in enumerate(_lines(p)):
            yield f"{label}:{i + 1}", line
    else:
        para, start = [], 1
        for i, line in enumerate(itertools.chain(_lines(p), [""])):
            if line.strip():
                if not para:
                    start = i + 1
                para.append(line)
            elif para:
                yield f"{label}:{start}", "\n".join(para)
                para = []


def _jsonl(p: Path, field: str, label: str | None = None) -> Iterator[tuple[str, str]]:
    label = label or p.name
    with _open_text(p) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise WorkbenchError(f"{p}:{i}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise WorkbenchError(f"{p}:{i}: no field {field!r} (has: {keys}); "
                                     f"use {p}:FIELD to pick the text field")
            text = obj[field]
            if not isinstance(text, str):
                raise WorkbenchError(f"{p}:{i}: field {field!r} is {type(text).__name__}, not text")
            yield f"{label}:{i}", text


_BUILTIN_CACHE: list[tuple[str, str]] = []
_BUILTIN_DONE = [False]


def _builtin_cached() -> Iterator[tuple[str, str]]:
    """The builtin documents, parsed lazily once per process and replayed afterwards."""
    i, gen, gen_pos = 0, None, 0
    while True:
        if i < len(_BUILTIN_CACHE):
            yield _BUILTIN_CACHE[i]
            i += 1
            continue
        if _BUILTIN_DONE[0]:
            return
        if gen is None:
            gen, gen_pos = _builtin(), 0
        try:
            while gen_pos <= i:         # catch up (another reader may have filled the cache)
                item = next(gen)
                gen_pos += 1
        except StopIteration:
            _BUILTIN_DONE[0] = True
            return
        if len(_BUILTIN_CACHE) == i:
            _BUILTIN_CACHE.append(item)
        yield item
        i += 1


CALENDAR_VERSION = 1
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_CALENDAR_TEMPLATES = [
    "The meeting was moved to {day}.", "Two days from {day} is {day2}.", "{day} comes right after {dayp}.",
    "We always go to the market on {day} mornings.", "The shop is closed every {day}.",
    "She was born in {month} {year}.", "{month} is followed by {month1}.", "Three months after {month} comes {month3}.",
    "The report was published on {day}, {month} {date}, {year}.", "In {year} the festival took place in {month}.",
    "The last {day} of {month} was cold.", "He moved to the city in {year} and left in {year2}.",
]


def _calendar() -> Iterator[tuple[str, str]]:
    """The synthetic calendar probe corpus (see the module docstring): seeded, so always the same."""
    import random
    rng = random.Random(CALENDAR_VERSION)
    for i in range(600):
        sents = []
        for _ in range(8):
            d, m, y = rng.randrange(7), rng.randrange(12), rng.randrange(1900, 2030)
            sents.append(rng.choice(_CALENDAR_TEMPLATES).format(
                day=_DAYS[d], day2=_DAYS[(d + 2) % 7], dayp=_DAYS[(d - 1) % 7], month=_MONTHS[m],
                month1=_MONTHS[(m + 1) % 12], month3=_MONTHS[(m + 3) % 12], year=y, year2=y + rng.randrange(1, 30),
                date=rng.randrange(1, 29)))
        yield f"calendar/{i}", " ".join(sents)


def _builtin() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        for fname in sorted(files):
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath) / fname
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError):
                continue
            docs = []
            nodes = [n for n in ast.walk(tree)
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            nodes.sort(key=lambda n: getattr(n, "lineno", 0))
            for node in nodes:
                d = ast.get_docstring(node, clean=True)
                if d and len(d.split()) >= 3:
                    docs.append(d.strip())
            if docs:
                yield "stdlib:" + path.relative_to(root).as_posix(), "\n\n".join(docs)
    try:
        from pydoc_data.topics import topics
    except ImportError:   # pragma: no cover - some distributions strip it
        return
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _hf(spec: str) -> Iterator[tuple[str, str]]:
    parts = spec[3:].split(":")
    name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    field = parts[2] if len(parts) > 2 and parts[2] else "text"
    if not name:
        raise WorkbenchError(f"corpus {spec!r}: give a dataset name, hf:NAME[:split[:field]]")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise WorkbenchError(f"corpus {spec!r} needs the `datasets` package (pip install datasets)") from None
    offline_env = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    hint = ("use corpus 'builtin', a .txt file or folder, or FILE.jsonl[:field] instead")
    if not offline_env and not _online():
        raise WorkbenchError(f"corpus {spec!r} is not available offline (huggingface.co is "
                             f"unreachable); {hint}, or set HF_DATASETS_OFFLINE=1 to use a cached copy")
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types
        raise WorkbenchError(f"corpus {spec!r}: could not load dataset {name!r} split {split!r} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}") from None
    return _hf_rows(ds, spec, field)


def _hf_rows(ds, spec: str, field: str) -> Iterator[tuple[str, str]]:
    for i, row in enumerate(ds):
        if field not in row:
            raise WorkbenchError(f"corpus {spec!r}: rows have no field {field!r} (has: {', '.join(row)})")
        yield f"{spec}:{i}", row[field]


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------- packing
def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special token ids the tokenizer adds around one text (e.g. [BOS], [] or
    [CLS], [SEP]), found by tokenising a probe text with and without special tokens."""
    probe = "hello world, this is a probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    n = len(plain)
    for k in range(len(full) - n + 1):
        if full[k:k + n] == plain:
            return list(full[:k]), list(full[k + n:])
    return [], []


def pack(docs: Iterable[Document], tokenizer, seq_len: int, *, add_special_tokens: bool = True,
         tokenize_batch: int = 32, windows_per_doc: int = 0, bos_id: int | None = None) -> Iterator[Window]:
    """Tokenise documents lazily and cut them into windows of at most ``seq_len`` tokens, one
    document per window (see the module docstring); ``windows_per_doc`` > 0 keeps only each
    document's first windows (many documents in few tokens: document-level comparisons).
    ``bos_id``: start every window with this token when the tokenizer does not already
    (TransformerLens' ``prepend_bos``). Raises WorkbenchError when the corpus yields no tokens at all."""
    prefix, suffix = special_wrapping(tokenizer) if add_special_tokens else ([], [])
    if bos_id is not None and prefix[:1] != [int(bos_id)]:
        prefix = [int(bos_id)] + prefix
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise WorkbenchError(f"seq_len={seq_len} leaves no room for text next to the tokenizer's "
                             f"{len(prefix) + len(suffix)} special token(s); use a larger --seq-len")
    any_window = False
    pending: list[Document] = []
    group = 1          # documents per tokenizer call: grows 1, 2, 4, ... up to tokenize_batch,
                       # so a small max_tokens does not tokenise far ahead

    fast = bool(getattr(tokenizer, "is_fast", False))   # offsets need a fast (Rust) tokenizer

    def flush():
        texts = [d.text for d in pending]
        extra = {"return_offsets_mapping": True} if fast else {}
        enc = tokenizer(texts, add_special_tokens=False, verbose=False, **extra)
        offsets = enc["offset_mapping"] if fast else [None] * len(texts)
        for d, ids, offs in zip(pending, enc["input_ids"], offsets):
            for j, s in enumerate(range(0, len(ids), body)):
                if windows_per_doc and j >= windows_per_doc:
                    break
                ends = None if offs is None else (
                    [-1] * len(prefix) + [int(e) for _, e in offs[s:s + body]] + [-1] * len(suffix))
                yield Window(d.id, prefix + list(ids[s:s + body]) + suffix, ends)
        pending.clear()

    for d in docs:
        if getattr(d, "pieces", None) is not None:      # a big file: tokenised piece by piece
            for w in itertools.chain(flush() if pending else (),
                                     _pack_pieces(d, tokenizer, prefix, suffix, body, windows_per_doc)):
                any_window = True
                yield w
            continue
        pending.append(d)
        if len(pending) >= group:
            group = min(tokenize_batch, group * 2)
            for w in flush():
                any_window = True
                yield w
    if pending:
        for w in flush():
            any_window = True
            yield w
    if not any_window:
        raise WorkbenchError("the corpus has no text (no documents, or only empty ones)")


def _pack_pieces(d: Document, tokenizer, prefix: list[int], suffix: list[int], body: int,
                 windows_per_doc: int) -> Iterator[Window]:
    """`pack` for a document read in pieces: each piece tokenised alone, tokens carried over
    into the next piece's windows, character ends counted from the document's start."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    extra = {"return_offsets_mapping": True} if fast else {}
    ids: list[int] = []
    ends: list[int] | None = [] if fast else None
    start, n_windows = 0, 0

    def window(a: int, b: int) -> Window:
        e = None if ends is None else [-1] * len(prefix) + ends[a:b] + [-1] * len(suffix)
        return Window(d.id, prefix + ids[a:b] + suffix, e)

    for piece in d.pieces():
        enc = tokenizer([piece], add_special_tokens=False, verbose=False, **extra)
        ids.extend(enc["input_ids"][0])
        if ends is not None:
            ends.extend(start + int(e) for _, e in enc["offset_mapping"][0])
        start += len(piece)
        n_full = len(ids) // body
        for k in range(n_full):
            yield window(k * body, (k + 1) * body)
            n_windows += 1
            if windows_per_doc and n_windows >= windows_per_doc:
                return
        del ids[:n_full * body]
        if ends is not None:
            del ends[:n_full * body]
    if ids:
        yield window(0, len(ids))


# ------------------------------------------------------------------------------- read-ahead
class ReadAhead:
    """Iterate `items` in a background thread, at most `depth` items ahead (a bounded queue), so
    tokenising the next batches overlaps the forward pass of this one (Hugging Face fast
    tokenizers release the GIL while they encode). Yields exactly what `items` yields, in order;
    an exception raised by `items` is re-raised here. `close()` (also on `with` exit) stops the
    thread early. depth=0: plain iteration in the caller's thread."""

    _END = object()

    def __init__(self, items: Iterable, depth: int = 4):
        import queue
        import threading
        self.depth = int(depth)
        self._items = items
        if self.depth <= 0:
            return
        self._q: "queue.Queue" = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, item)):
                    return
        except BaseException as e:     # noqa: BLE001 - handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((True, self._END))

    def __iter__(self):
        if self.depth <= 0:
            yield from self._items
            return
        try:
            while True:
                ok, item = self._q.get()
                if not ok:
                    raise item
                if item is self._END:
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if self.depth > 0:
            self._stop.set()
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
