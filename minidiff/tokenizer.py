"""CLIP's byte-level BPE tokenizer, written out by hand: prompt -> 77 token ids.

Clean the text (:func:`clean_text`: NFC, whitespace runs -> one space, lower-case), cut it into
words (:data:`PATTERN`), spell each word's UTF-8 bytes with 256 printable symbols
(:func:`bytes_to_unicode`), mark the last one ``</w>``, and merge the adjacent pair of lowest rank
in the merges file until none is left: ``c a t</w>`` -> ``c at</w>`` -> ``cat</w>`` (id 2368).
A prompt becomes int32 (n, 77): ``[49406] + ids + [49407]``, padded with 49407 (SD 1.x) or 0
(SD 2.x).  Vocabulary: 2 x 256 byte symbols + 48,894 merges + 2 special tokens = 49,408 ids;
OpenAI's merges file ships as :data:`BUNDLED_VOCAB` (MIT licence).  Gives transformers'
``CLIPTokenizer`` ids; the differences from it and from OpenAI's code (no ftfy, lower-casing per
letter, special tokens as written, "!" as text in SD 2) are listed in README.md.  Lesson 8.
"""

from __future__ import annotations

import gzip
import html
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from .config import read_json

__all__ = [
    "CLIPTokenizer", "bytes_to_unicode", "clean_text", "PATTERN",
    "START_TOKEN", "END_TOKEN", "CONTEXT_LENGTH", "BUNDLED_VOCAB",
]

START_TOKEN = "<|startoftext|>"  # id 49406 in CLIP's vocabulary
END_TOKEN = "<|endoftext|>"      # id 49407; SD 1.x also pads with it
CONTEXT_LENGTH = 77              # CLIP's text transformer has 77 positions: start + 75 tokens + end
BUNDLED_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# OpenAI's file holds more merges than CLIP uses: the first 49152 - 256 - 2 = 48,894 of them, so
# that 2 * 256 byte symbols + 48,894 merged symbols + 2 special tokens = 49,408 ids.
N_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer: English contractions, a run of letters, ONE digit (so "1920" is four
# tokens), or a run of anything that is neither space, letter nor digit ("!!", "😀").  OpenAI's
# pattern starts with "<\|startoftext\|>|<\|endoftext\|>|"; here the special tokens are split off the
# raw prompt first (SPECIALS), as transformers does, so the pattern leaves them out (see above).
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
WHITESPACE = regex.compile(r"\s+")  # Unicode White_Space (tabs, newlines, U+00A0, U+3000, ...)
SPECIALS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")  # split on them, keeping them
_CACHE_SIZE = 100_000  # words remembered by CLIPTokenizer.bpe before the cache is emptied


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """The 256 bytes -> 256 printable characters used to spell words in the vocabulary.

    The printable bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves; the 68 others
    (space, control characters, ...) are shifted to chr(256), chr(257), ...  So "é" (bytes C3 A9)
    is spelled "Ã©", and a space would be "Ġ" (it never appears: words are split on spaces).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def clean_text(text: str, unescape_html: bool = False) -> str:
    """CLIP's text clean-up: NFC, (HTML entities un-escaped twice, if asked), whitespace runs ->
    one space, strip, lower-case letter by letter.  ``"  A\\tCafe\\u0301 "`` -> ``"a café"``."""
    text = unicodedata.normalize("NFC", text)
    if unescape_html:
        text = html.unescape(html.unescape(text))  # as OpenAI: "&amp;amp;" -> "&"
    text = WHITESPACE.sub(" ", text).strip(" ")  # not str.strip(): it would also drop "\x1c".."\x1f"
    return text.replace("Σ", "σ").lower()  # each letter on its own: no final "ς" (see above)


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (SD 1.x and 2.x use the same vocabulary).

    ``vocab``: token string -> id; ``merges``: symbol pairs in rank order (rank 0 is merged first).
    ``pad_id``: the id that fills a prompt to 77 tokens (default: the end token, as SD 1.x; SD 2.x
    pads with 0, the token "!").  ``unescape_html``: un-escape "&amp;" etc. as OpenAI/open_clip do.

    >>> tok = CLIPTokenizer.from_bpe_gz()           # the vocabulary shipped with minidiff
    >>> tok.encode("a photo of a cat")
    [320, 1125, 539, 320, 2368]
    >>> tok(["a photo of a cat"]).shape             # [49406, 320, ..., 2368, 49407, 49407, ...]
    (1, 77)
    """

    def __init__(self, vocab: dict[str, int], merges, *, pad_id: int | None = None, unescape_html: bool = False):
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        if len(self.decoder) != len(self.encoder) or not all(isinstance(i, int) for i in self.decoder):
            raise ValueError("the CLIP vocabulary must map each token to its own integer id")
        self.bpe_ranks = {}
        for rank, pair in enumerate(merges):
            pair = tuple(pair)
            if len(pair) != 2:
                raise ValueError(f"merge {rank} should be a pair of symbols, got {pair!r}")
            self.bpe_ranks.setdefault(pair, rank)
        # Every symbol BPE can produce must have an id: the 2 x 256 byte symbols and each merge.
        symbols = [*bytes_to_unicode().values(), *(c + "</w>" for c in bytes_to_unicode().values()),
                   *("".join(p) for p in self.bpe_ranks), START_TOKEN, END_TOKEN]
        missing = [s for s in symbols if s not in self.encoder]
        if missing:
            raise ValueError(f"the CLIP vocabulary lacks {len(missing)} tokens that its merges or bytes "
                             f"produce, e.g. {missing[:5]}")
        self.start_id, self.end_id = self.encoder[START_TOKEN], self.encoder[END_TOKEN]
        self.pad_id = self.end_id if pad_id is None else self._check_id(pad_id, "pad_id")
        self.unescape_html = unescape_html
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: dict[str, tuple[str, ...]] = {}
        self.added: dict[str, int] = {}  # textual inversion's placeholder tokens (add_tokens)
        self._split = SPECIALS

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, merges={len(self.bpe_ranks)}, "
                f"start_id={self.start_id}, end_id={self.end_id}, pad_id={self.pad_id})")

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_json, merges_txt, **kwargs) -> "CLIPTokenizer":
        """From a ``vocab.json`` (token -> id) and ``merges.txt`` (one "a b" pair a line, after an
        optional "#version" header): the layout of a diffusers ``tokenizer/`` folder."""
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        for path, what in ((vocab_json, "vocabulary (vocab.json)"), (merges_txt, "merges (merges.txt)")):
            if not path.is_file():
                raise FileNotFoundError(f"CLIP tokenizer {what} file not found: {path}")
        vocab = read_json(vocab_json, "JSON vocabulary")  # token -> id
        lines = _read_text(merges_txt).split("\n")
        header = lines[0].startswith("#version")  # "#version: 0.2", written by transformers
        merges = _parse_merges(lines[1:] if header else lines, merges_txt, first_line=2 if header else 1)
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_folder(cls, path, **kwargs) -> "CLIPTokenizer":
        """From a diffusers model folder (its ``tokenizer/`` subfolder) or the tokenizer folder itself.

        The pad token is read from ``special_tokens_map.json`` or ``tokenizer_config.json`` where
        present (SD 2.x folders say "!", id 0), unless ``pad_id`` is given."""
        path = Path(path)
        folder = next((f for f in (path, path / "tokenizer") if (f / "vocab.json").is_file()), None)
        if folder is None:
            raise FileNotFoundError(f"no CLIP tokenizer in {path}: expected {path / 'tokenizer' / 'vocab.json'} "
                                    f"(a diffusers model folder) or {path / 'vocab.json'} (its tokenizer folder)")
        pad = None if "pad_id" in kwargs else _configured_pad_token(folder)
        tok = cls.from_files(folder / "vocab.json", folder / "merges.txt", **kwargs)
        if pad is not None:
            if pad not in tok.encoder:
                raise ValueError(f"{folder}: the pad token {pad!r} is not in vocab.json")
            tok.pad_id = tok.encoder[pad]
        return tok

    @classmethod
    def from_bpe_gz(cls, path=None, **kwargs) -> "CLIPTokenizer":
        """From OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (default: the copy shipped with minidiff).

        The file is a header line, then merges.  The vocabulary is built as OpenAI's
        ``simple_tokenizer`` builds it: the 256 byte symbols, the same with ``</w>``, each of the
        first 48,894 merges joined, then ``<|startoftext|>`` and ``<|endoftext|>``."""
        path = BUNDLED_VOCAB if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {path}")
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a gzip-compressed BPE merges file: {e}") from None
        lines = text.split("\n")[1:N_MERGES + 1]
        merges = _parse_merges(lines, path, first_line=2)
        if len(merges) < N_MERGES:
            raise ValueError(f"{path} holds only {len(merges)} merges; CLIP's vocabulary uses the first {N_MERGES}")
        symbols = list(bytes_to_unicode().values())
        symbols += [s + "</w>" for s in symbols]
        symbols += ["".join(pair) for pair in merges] + [START_TOKEN, END_TOKEN]
        return cls({s: i for i, s in enumerate(symbols)}, merges, **kwargs)

    def add_tokens(self, tokens) -> list[int]:
        """Add placeholder tokens (textual inversion's ``"<zigzag>"``) with new ids after the vocabulary:
        49408, 49409, ...  An added token is matched in the raw prompt, exactly as written (before
        lower-casing and BPE, like the start and end tokens), so "a <zigzag> square" is three tokens.
        Returns the new ids; the text encoder needs one more embedding row per token."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        ids = []
        for token in tokens:
            if not isinstance(token, str) or not token or regex.search(r"\s", token):
                raise ValueError(f"an added token must be a non-empty string without spaces, got {token!r}")
            if token in self.encoder:  # an added token, a special token, or a vocabulary entry such as "cat</w>"
                raise ValueError(f"the token {token!r} is already in the tokenizer")
            if regex.fullmatch(r"[\p{L}\p{N}]+", token):  # "sks" would also match inside "asks"
                raise ValueError(f"an added token must hold a character other than letters and digits, so that it "
                                 f"is never found inside a word: use e.g. '<{token}>' instead of {token!r}")
            new_id = len(self.encoder)
            self.encoder[token], self.decoder[new_id], self.added[token] = new_id, token, new_id
            ids.append(new_id)
        names = sorted([START_TOKEN, END_TOKEN, *self.added], key=len, reverse=True)  # longest first
        self._split = regex.compile("(" + "|".join(regex.escape(t) for t in names) + ")")
        return ids

    # --- text -> ids --------------------------------------------------------------------------

    def bpe(self, word: str) -> tuple[str, ...]:
        """Byte-pair merges of one word (already spelled with :func:`bytes_to_unicode` characters).

        ``"cat"`` -> ``("cat</w>",)``; ``"tokenizer"`` -> ``("token", "izer</w>")``.
        """
        if word in self.cache:
            return self.cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]  # c a t</w>
        while len(symbols) > 1:
            # the adjacent pair that was learnt first (lowest rank); stop when no pair is a merge
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            # merge every occurrence of that pair, left to right
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self.cache) >= _CACHE_SIZE:
            self.cache.clear()
        self.cache[word] = tuple(symbols)
        return self.cache[word]

    def tokenize(self, text: str) -> list[str]:
        """The vocabulary entries of ``text`` (no start/end tokens): "A cat!" -> ['a</w>', 'cat</w>', '!</w>']."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        tokens = []
        for piece in self._split.split(text):  # special and added tokens typed in the prompt stay whole
            if piece in (START_TOKEN, END_TOKEN) or piece in self.added:
                tokens.append(piece)
                continue
            for word in PATTERN.findall(clean_text(piece, self.unescape_html)):
                spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                tokens.extend(self.bpe(spelled))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens: "a photo of a cat" -> [320, 1125, 539, 320, 2368]."""
        return [self.encoder[t] for t in self.tokenize(text)]

    def __call__(self, prompts, length: int = CONTEXT_LENGTH, pad_token: int | None = None,
                 names=None) -> np.ndarray:
        """int32 (n, length) ids: ``[start] + encode(prompt) + [end]``, then ``pad_token``
        (default ``self.pad_id``: the end token for SD 1.x; pass 0 for SD 2.x / open_clip).

        A prompt longer than ``length - 2`` tokens is cut there (the end token stays last), with a
        warning saying how many tokens were dropped (``names``: what to call each prompt there,
        default "prompt 0", "prompt 1"...).  A single str gives one row.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if length < 2:
            raise ValueError(f"length must leave room for the start and end tokens (>= 2), got {length}")
        pad = self.pad_id if pad_token is None else self._check_id(pad_token, "pad_token")
        out = np.full((len(prompts), length), pad, dtype=np.int32)
        room = length - 2
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                dropped = self.decode(ids[room:])
                shown = dropped if len(dropped) <= 60 else dropped[:57] + "..."
                name = names[row] if names is not None else f"prompt {row}"
                warnings.warn(f"{name} is {len(ids)} tokens long but only {room} fit between the start "
                              f"and end tokens: {len(ids) - room} tokens were dropped ({shown!r})", stacklevel=2)
                ids = ids[:room]
            out[row, :len(ids) + 2] = [self.start_id, *ids, self.end_id]
        return out

    # --- ids -> text --------------------------------------------------------------------------

    def decode(self, ids) -> str:
        """Text of a row of ids: start tokens are skipped and decoding stops at the first end token
        (so SD 1.x and SD 2.x padding both vanish); each ``</w>`` becomes a space.  Lower-cased and
        cleaned, as the tokenizer saw it: decode(encode("A cat!")) == "a cat !"."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one row of ids, got an array of shape {ids.shape}")
        data = bytearray()
        for i in ids.tolist():
            token = self.decoder.get(i) if isinstance(i, int) else None
            if token is None:
                raise ValueError(f"token id {i!r} is not in the vocabulary (0..{self.vocab_size - 1})")
            if i == self.end_id:
                break
            if i == self.start_id:
                continue
            if token in self.added:
                data += token.encode("utf-8") + b" "
                continue
            end_of_word = token.endswith("</w>")
            data += bytes(self.byte_decoder[c] for c in token.removesuffix("</w>"))
            if end_of_word:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()

    def _check_id(self, i, name: str) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or int(i) not in self.decoder:
            raise ValueError(f"{name} must be a token id in 0..{self.vocab_size - 1}, got {i!r}")
        return int(i)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None


def _parse_merges(lines, path: Path, first_line: int) -> list[tuple[str, str]]:
    """'a b' lines -> [('a', 'b'), ...]; blank lines are skipped, anything else is an error."""
    merges = []
    for n, line in enumerate(lines, start=first_line):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path}, line {n}: a merge is two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _configured_pad_token(folder: Path) -> str | None:
    """The pad token named in a tokenizer folder's special_tokens_map.json / tokenizer_config.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        pad = read_json(path).get("pad_token")
        if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None
