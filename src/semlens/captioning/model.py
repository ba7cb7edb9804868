"""Attentive video captioner of Dong et al. (CVPR 2017): BiLSTM encoder over per-frame features,
soft-attention LSTM decoder, and a topic head ``f`` (softmax-linear map from the time-averaged
encoder state to topic space) used by the interpretive loss and by prediction-difference maximization.

Shapes: ``feats`` (B, T, F) float32 per-frame features, ``lengths`` (B,) int64 number of valid
frames (padded frames beyond it are ignored everywhere), ``tokens`` (B, L) int64 word ids with
``PAD = 0``. The interpretable representation is ``v`` (B, T, D) with ``D = 2 * hidden``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from semlens.checkpoint import CheckpointError, load_state_dict, read_config, save_weights

__all__ = [
    "PAD",
    "BOS",
    "EOS",
    "UNK",
    "Vocabulary",
    "VocabularyMismatchError",
    "CaptionerConfig",
    "AttentiveCaptioner",
    "tokenize",
    "pad_features",
]

PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(sentence: str) -> list[str]:
    """Lower-case word tokens (letters/digits, inner apostrophes kept); punctuation dropped."""
    return _WORD.findall(sentence.lower())


class VocabularyMismatchError(CheckpointError):
    """A checkpoint whose vocabulary differs from the one it is used with."""


class Vocabulary:
    """Word <-> id map with the specials ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``.

    Built from training captions keeping words seen at least ``min_count`` times (Dong et al. 2017
    recommends 3 on MSVD). Words are sorted by decreasing count, then alphabetically (deterministic).
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:4] != _SPECIALS:
            words = _SPECIALS + [w for w in words if w not in _SPECIALS]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary contains duplicate words")
        self.words: list[str] = words
        self.index: dict[str, int] = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if not kept:
            raise ValueError(f"no word occurs at least min_count={min_count} times in the captions")
        return cls(kept)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, sentence: str, max_len: int | None = None) -> list[int]:
        """Word ids of ``sentence`` framed as ``BOS w1 .. wn EOS`` (words truncated to ``max_len``)."""
        ids = [self.index.get(w, UNK) for w in tokenize(sentence)]
        if not ids:
            raise ValueError(f"caption {sentence!r} has no words")
        if max_len is not None:
            ids = ids[:max_len]
        return [BOS, *ids, EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first EOS; PAD/BOS skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.words[i])
        return " ".join(out)


def pad_features(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-video ``(T_k, F)`` features into ``(B, T_max, F)`` zero-padded, plus ``lengths`` (B,)."""
    if not seqs:
        raise ValueError("no feature sequences given")
    dims = {int(s.shape[-1]) for s in seqs}
    if len(dims) != 1 or any(s.dim() != 2 or s.shape[0] == 0 for s in seqs):
        raise ValueError(f"feature sequences must be non-empty (T, F) with one F; got shapes "
                         f"{sorted({tuple(s.shape) for s in seqs})[:5]}")
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = seqs[0].new_zeros(len(seqs), int(lengths.max()), dims.pop())
    for k, s in enumerate(seqs):  # B copies, one per video (not per frame/unit)
        out[k, : s.shape[0]] = s
    return out, lengths


@dataclass
class CaptionerConfig:
    """Sizes of the captioner; saved as JSON with its weights (``vocab`` included)."""

    feature_dim: int
    vocab: list[str]
    n_topics: int = 20
    hidden: int = 512  # per direction: D = 2 * hidden
    embed: int = 512
    decoder_hidden: int = 512
    attention: int = 256
    dropout: float = 0.5
    max_len: int = 20
    topic_dropout: float = 0.0  # dropout on v̄ before f while training (regularises the interpretive loss)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AttentiveCaptioner(nn.Module):
    """BiLSTM encoder -> soft-attention LSTM decoder, plus topic head ``f(v̄) = softmax(W_f v̄ + b_f)``.

    LSTM-B and LSTM-I share this architecture; they differ only in the training loss
    (see :mod:`semlens.captioning.training`).
    """

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        c = config
        if c.feature_dim <= 0 or c.hidden <= 0 or c.n_topics <= 0:
            raise ValueError(f"invalid captioner sizes: {c}")
        if not (0.0 <= c.dropout < 1.0 and 0.0 <= c.topic_dropout < 1.0):
            raise ValueError(f"dropout and topic_dropout must lie in [0, 1); got {c.dropout}, {c.topic_dropout}")
        self.config = c
        self.vocab = Vocabulary(c.vocab)
        c.vocab = self.vocab.words
        V, D = len(self.vocab), 2 * c.hidden
        self.encoder = nn.LSTM(c.feature_dim, c.hidden, batch_first=True, bidirectional=True)
        self.enc_drop = nn.Dropout(c.dropout)
        self.topic_head = nn.Linear(D, c.n_topics)  # f
        self.topic_drop = nn.Dropout(c.topic_dropout)  # identity in eval mode (PDM, selectivity, decoding)
        self.embedding = nn.Embedding(V, c.embed, padding_idx=PAD)
        self.init_h = nn.Linear(D, c.decoder_hidden)
        self.init_c = nn.Linear(D, c.decoder_hidden)
        self.att_h = nn.Linear(c.decoder_hidden, c.attention)  # W_a, b_a
        self.att_v = nn.Linear(D, c.attention, bias=False)  # U_a
        self.att_w = nn.Linear(c.attention, 1, bias=False)  # w
        self.decoder = nn.LSTMCell(c.embed + D, c.decoder_hidden)
        self.dec_drop = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.decoder_hidden, V)

    @property
    def rep_dim(self) -> int:
        """D, the number of interpretable neurons (coordinates of v_i)."""
        return 2 * self.config.hidden

    # ---------------------------------------------------------------- encoder
    def _check(self, feats: torch.Tensor, lengths: torch.Tensor) -> None:
        if feats.dim() != 3 or feats.shape[-1] != self.config.feature_dim:
            raise ValueError(f"feats must be (B, T, {self.config.feature_dim}); got {tuple(feats.shape)}")
        if lengths.shape != (feats.shape[0],):
            raise ValueError(f"lengths must be ({feats.shape[0]},); got {tuple(lengths.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > feats.shape[1]:
            raise ValueError(f"lengths must lie in [1, {feats.shape[1]}]; got {lengths.tolist()[:10]}")
        if not torch.isfinite(feats).all():
            raise ValueError("feats contain NaN or inf")

    def frame_mask(self, lengths: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T) bool: True on valid frames."""
        return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]

    def encode(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``v`` (B, T, D) (zeros at padded frames) and the frame mask (B, T) bool."""
        self._check(feats, lengths)
        T = feats.shape[1]
        packed = pack_padded_sequence(feats, lengths.cpu(), batch_first=True, enforce_sorted=False)
        v, _ = self.encoder(packed)
        v, _ = pad_packed_sequence(v, batch_first=True, total_length=T)
        return v, self.frame_mask(lengths.to(v.device), T)

    @staticmethod
    def mean_rep(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """v̄ = temporal mean of v over valid frames: (B, D)."""
        m = mask.to(v.dtype).unsqueeze(-1)
        return (v * m).sum(1) / m.sum(1)

    def topic_logits(self, vbar: torch.Tensor) -> torch.Tensor:
        """W_f v̄ + b_f: (B, K)."""
        return self.topic_head(vbar)

    def topics(self, vbar: torch.Tensor) -> torch.Tensor:
        """f(v̄) = softmax(W_f v̄ + b_f): (B, K) on the simplex (in training mode v̄ first passes the topic
        dropout, ``config.topic_dropout``)."""
        return torch.softmax(self.topic_head(self.topic_drop(vbar)), dim=-1)

    # ---------------------------------------------------------------- decoder
    def _init_state(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vbar = self.mean_rep(v, mask)
        return torch.tanh(self.init_h(vbar)), torch.tanh(self.init_c(vbar))

    def _step(self, word: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor,
              v_proj: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                                                               torch.Tensor]:
        """One decoder step: (B,) previous word -> logits (B, V), new state, attention (B, T)."""
        h, c = state
        e = self.att_w(torch.tanh(self.att_h(h).unsqueeze(1) + v_proj)).squeeze(-1)  # (B, T)
        e = e.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(e, dim=-1)
        phi = torch.bmm(alpha.unsqueeze(1), v).squeeze(1)  # (B, D)
        h, c = self.decoder(torch.cat([self.embedding(word), phi], dim=-1), (h, c))
        return self.out(self.dec_drop(h)), (h, c), alpha

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing. ``tokens`` (B, L) = BOS w1 .. EOS PAD..; returns logits (B, L-1, V) predicting
        ``tokens[:, 1:]``, plus ``v`` (B, T, D) and the frame mask (B, T)."""
        if tokens.dim() != 2 or tokens.shape[0] != feats.shape[0] or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be (B={feats.shape[0]}, L>=2); got {tuple(tokens.shape)}")
        v, mask = self.encode(feats, lengths)
        vd = self.enc_drop(v)
        state = self._init_state(vd, mask)
        v_proj = self.att_v(vd)
        logits = []
        for t in range(tokens.shape[1] - 1):  # recurrence over time steps (batched over videos)
            lo, state, _ = self._step(tokens[:, t], state, vd, v_proj, mask)
            logits.append(lo)
        return torch.stack(logits, 1), v, mask

    @staticmethod
    def _no_specials(logits: torch.Tensor) -> torch.Tensor:
        """Forbid generating PAD and BOS (decoding only; training sees the full softmax)."""
        return logits.index_fill(-1, torch.tensor([PAD, BOS], device=logits.device), float("-inf"))

    @torch.no_grad()
    def greedy(self, feats: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding: (B, L) word ids (no BOS), EOS kept, PAD after it."""
        v, mask = self.encode(feats, lengths)
        return self._greedy_states(v, mask, max_len)

    @torch.no_grad()
    def decode_states(self, v: torch.Tensor, mask: torch.Tensor, beam: int = 1, max_len: int | None = None,
                      length_penalty: float = 0.0) -> torch.Tensor:
        """Decode from given encoder states ``v`` (B, T, D) with frame mask (B, T) bool: (B, L) word ids
        (no BOS, EOS kept, PAD after). ``beam=1`` is greedy decoding (as :meth:`greedy`), else beam search."""
        if v.dim() != 3 or v.shape[-1] != self.rep_dim:
            raise ValueError(f"v must be (B, T, {self.rep_dim}); got {tuple(v.shape)}")
        if mask.shape != v.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {tuple(v.shape[:2])}; got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):
            raise ValueError("every sample needs at least one valid frame in mask")
        if not torch.isfinite(v).all():
            raise ValueError("v contains NaN or inf")
        if beam == 1:
            return self._greedy_states(v, mask, max_len)
        return self._beam_states(v, mask, beam, max_len, length_penalty)

    def _greedy_states(self, v: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
        max_len = max_len or self.config.max_len + 1
        v_proj = self.att_v(v)
        state = self._init_state(v, mask)
        word = torch.full((v.shape[0],), BOS, dtype=torch.long, device=v.device)
        done = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
        out = []
        for _ in range(max_len):
            logits, state, _ = self._step(word, state, v, v_proj, mask)
            word = self._no_specials(logits).argmax(-1).masked_fill(done, PAD)
            out.append(word)
            done = done | (word == EOS)
            if bool(done.all()):
                break
        return torch.stack(out, 1)

    @torch.no_grad()
    def beam_search(self, feats: torch.Tensor, lengths: torch.Tensor, beam: int = 5, max_len: int | None = None,
                    length_penalty: float = 0.0) -> torch.Tensor:
        """Batched beam search: (B, L) word ids of the best hypothesis per video (EOS kept, PAD after).

        Hypotheses are ranked by ``sum log p / len**length_penalty``. ``beam=1`` is greedy decoding.
        """
        if beam < 1:
            raise ValueError(f"beam must be >= 1; got {beam}")
        v, mask = self.encode(feats, lengths)
        return self._beam_states(v, mask, beam, max_len, length_penalty)

    def _beam_states(self, v: torch.Tensor, mask: torch.Tensor, beam: int, max_len: int | None,
                     length_penalty: float) -> torch.Tensor:
        if beam < 1:
            raise ValueError(f"beam must be >= 1; got {beam}")
        max_len = max_len or self.config.max_len + 1
        B, T, D = v.shape
        K = beam
        v = v.repeat_interleave(K, 0)
        mask = mask.repeat_interleave(K, 0)
        v_proj = self.att_v(v)
        state = self._init_state(v, mask)
        dev = v.device
        score = torch.full((B, K), float("-inf"), device=dev)
        score[:, 0] = 0.0
        words = torch.full((B * K,), BOS, dtype=torch.long, device=dev)
        seqs = torch.zeros(B, K, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        length = torch.zeros(B, K, device=dev)
        for _ in range(max_len):
            logits, state, _ = self._step(words, state, v, v_proj, mask)
            logp = torch.log_softmax(self._no_specials(logits.float()), -1).view(B, K, -1)
            Vn = logp.shape[-1]
            # finished hypotheses only extend with PAD at no cost
            frozen = torch.full_like(logp, float("-inf"))
            frozen[..., PAD] = 0.0
            logp = torch.where(done.unsqueeze(-1), frozen, logp)
            cand = (score.unsqueeze(-1) + logp).view(B, K * Vn)
            score, flat = cand.topk(K, dim=-1)
            parent, word = flat // Vn, flat % Vn
            seqs = torch.cat([seqs.gather(1, parent.unsqueeze(-1).expand(-1, -1, seqs.shape[-1])),
                              word.unsqueeze(-1)], -1)
            done = done.gather(1, parent)
            length = length.gather(1, parent) + (~done).float()
            done = done | (word == EOS)
            idx = (parent + torch.arange(B, device=dev).unsqueeze(1) * K).view(-1)
            state = (state[0][idx], state[1][idx])
            words = word.view(-1)
            if bool(done.all()):
                break
        ranked = score / length.clamp(min=1) ** length_penalty if length_penalty else score
        best = ranked.argmax(1)
        return seqs[torch.arange(B, device=dev), best]

    def decode_batch(self, feats: torch.Tensor, lengths: torch.Tensor, beam: int = 1) -> list[str]:
        """Captions (strings) for a batch of videos."""
        return [self.vocab.decode(row) for row in self.beam_search(feats, lengths, beam=beam).tolist()]

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Weights to ``path`` (.safetensors) with the config (incl. vocabulary) as JSON metadata."""
        cfg = self.config.to_json()
        if extra:
            cfg["extra"] = {**cfg.get("extra", {}), **extra}
        return save_weights(self, path, config={"captioner": cfg})

    @classmethod
    def load(cls, path: str | os.PathLike, vocab: Vocabulary | Sequence[str] | None = None,
             map_location: str | torch.device = "cpu") -> AttentiveCaptioner:
        """Rebuild from a file written by :meth:`save`. If ``vocab`` is given and differs from the
        checkpoint's, :class:`VocabularyMismatchError` is raised (word ids would be meaningless)."""
        cfg = read_config(path).get("captioner")
        if not cfg:
            raise CheckpointError(f"{path} is not a semlens captioner checkpoint (no 'captioner' config)")
        if vocab is not None:
            words = vocab.words if isinstance(vocab, Vocabulary) else Vocabulary(vocab).words
            if words != Vocabulary(cfg["vocab"]).words:
                ours, theirs = set(words), set(cfg["vocab"])
                raise VocabularyMismatchError(
                    f"checkpoint {path} was trained with a different vocabulary ({len(theirs)} vs {len(ours)} "
                    f"words; e.g. only in checkpoint: {sorted(theirs - ours)[:5]}, only here: "
                    f"{sorted(ours - theirs)[:5]})")
        model = cls(CaptionerConfig(**cfg))
        state = load_state_dict(path, map_location=map_location)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{path} does not fit its own config: {err}") from err
        return model.to(map_location)

