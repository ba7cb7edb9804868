"""Correcting a video captioner through PDM-named neurons (Dong et al. 2017)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from semlens.captioning.model import AttentiveCaptioner, CaptionerConfig, Vocabulary
from semlens.captioning.naming import NeuronTopics
from semlens.correct.captioner import CaptionCorrector, caption_mentions, evaluate_caption_correction

CAPS = ["a dog runs", "a cat sleeps", "the dog sleeps", "a cat runs fast", "a man cooks food"]
TOPICS = ["dog", "cat", "run"]
F, T = 6, 5


def tiny_model(seed: int = 0) -> AttentiveCaptioner:
    torch.manual_seed(seed)
    vocab = Vocabulary.build(CAPS)
    cfg = CaptionerConfig(feature_dim=F, vocab=vocab.words, n_topics=3, hidden=4, embed=6, decoder_hidden=7,
                          attention=5, dropout=0.0, max_len=6)
    return AttentiveCaptioner(cfg).eval()


def tiny_names() -> NeuronTopics:
    # D = 8 neurons: dog -> 3 (stronger) and 0, cat -> 5, "run" carried by none, others unnamed
    topic = torch.tensor([0, -1, -1, 0, -1, 1, -1, -1])
    diff = torch.zeros(8, 3)
    diff[0, 0], diff[3, 0], diff[5, 1] = 0.1, 0.3, 0.2
    return NeuronTopics(diff, topic, diff.max(1).values, list(TOPICS))


def tiny_data(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, T, F, generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    lengths[0] = T
    feats[torch.arange(T)[None, :] >= lengths[:, None]] = 0.0
    s = torch.softmax(3 * torch.randn(n, 3, generator=g), 1)
    return feats, lengths, s


def test_fit_matches_float64_reference():
    model, names = tiny_model(), tiny_names()
    feats, lengths, s = tiny_data()
    corr = CaptionCorrector.fit(model, names, feats, lengths, s, threshold=0.3, batch_size=3)
    model64 = tiny_model().double()
    for t in range(3):
        rows = []
        for n in range(feats.shape[0]):  # independent per-video reference
            if s[n, t] >= 0.3 or int(s[n].argmax()) == t:
                v, _ = model64.encode(feats[n:n + 1, : int(lengths[n])].double(), lengths[n:n + 1])
                rows.append(v[0].mean(0))
        expect = torch.stack(rows).mean(0)
        torch.testing.assert_close(corr.references[t].double(), expect, atol=1e-5, rtol=1e-5)


def test_enhancement_adds_reference_on_named_neurons_at_valid_steps_only():
    model, names = tiny_model(), tiny_names()
    feats, lengths, _ = tiny_data()
    refs = torch.arange(24, dtype=torch.float32).view(3, 8) + 1.0
    corr = CaptionCorrector(model, names, refs)
    topics = [["dog"], [1], ["dog", "cat"], [], [0, 0]] + [[]] * 5
    vstar, mask = corr.enhanced_states(feats, lengths, topics)
    with torch.no_grad():
        v, mask0 = model.encode(feats, lengths)
    assert torch.equal(mask, mask0)
    diff = vstar - v
    expect = torch.zeros(10, 8)
    expect[0, [0, 3]] = refs[0, [0, 3]]
    expect[1, 5] = refs[1, 5]
    expect[2, [0, 3]] = refs[0, [0, 3]]
    expect[2, 5] = refs[1, 5]
    expect[4, [0, 3]] = refs[0, [0, 3]]  # a repeated topic counts once
    full = expect[:, None, :] * mask[..., None]
    torch.testing.assert_close(diff, full, atol=1e-6, rtol=0)
    assert torch.equal(vstar[~mask], torch.zeros_like(vstar[~mask]))  # padded steps stay exactly 0
    assert bool((lengths < T).any())
    # max_neurons keeps only the strongest neuron of "dog" (3)
    one = CaptionCorrector(model, names, refs, max_neurons=1)
    assert one.neurons("dog") == [3] and corr.neurons("dog") == [3, 0]
    d = one.delta(["dog"])
    assert d[3] == refs[0, 3] and int((d != 0).sum()) == 1


def test_decode_states_equals_greedy_and_beam_and_captions_use_vstar():
    model, names = tiny_model(), tiny_names()
    feats, lengths, _ = tiny_data()
    with torch.no_grad():
        v, mask = model.encode(feats, lengths)
    assert torch.equal(model.decode_states(v, mask), model.greedy(feats, lengths))
    assert torch.equal(model.decode_states(v, mask, beam=3), model.beam_search(feats, lengths, beam=3))
    refs = 5.0 * torch.ones(3, 8)
    corr = CaptionCorrector(model, names, refs)
    assert corr.captions(feats, lengths) == model.decode_batch(feats, lengths, beam=1)
    topics = [["cat"]] * 10
    vstar, mask = corr.enhanced_states(feats, lengths, topics)
    expect = [model.vocab.decode(r) for r in model.decode_states(vstar, mask).tolist()]
    assert corr.captions(feats, lengths, topics) == expect
    with pytest.raises(ValueError, match="mask"):
        model.decode_states(v, mask[:, :2])


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in m.state_dict().items()}


def test_propagation_updates_only_encoder_and_mu_infinity_freezes(monkeypatch):
    import semlens.correct.captioner as cc

    model, names = tiny_model(), tiny_names()
    seen: list[set[int]] = []
    real = cc.propagate

    def spy(*args, **kwargs):
        seen.append({id(p) for p in kwargs["params"]})
        return real(*args, **kwargs)

    monkeypatch.setattr(cc, "propagate", spy)
    feats, lengths, s = tiny_data()
    corr = CaptionCorrector.fit(model, names, feats, lengths, s)
    topics = [["dog"]] * 6 + [["cat"]] * 4
    before = _state(model)
    model.train()
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    res = corr.propagate(feats, lengths, topics, mu=0.0, steps=15, lr=1e-2, batch_size=4)
    after = _state(model)
    assert model.training and flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert res.steps == 15 and res.data_loss[-1] < 0.8 * res.data_loss[0]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)
    assert {k for k in before if k.startswith("encoder.")} == changed
    assert seen == [{id(p) for p in model.encoder.parameters()}]  # the anchor term covers the encoder only
    # mu -> inf: the proximal anchor keeps every parameter where it was
    model2 = tiny_model()
    corr2 = CaptionCorrector(model2, names, corr.references)
    b2 = _state(model2)
    res2 = corr2.propagate(feats, lengths, topics, mu=1e12, steps=10, lr=1e-2)
    a2 = _state(model2)
    assert max(float((b2[k] - a2[k]).abs().max()) for k in b2) < 1e-9
    assert res2.anchor[-1] < 1e-15


def test_errors_name_the_culprit():
    model, names = tiny_model(), tiny_names()
    feats, lengths, s = tiny_data()
    corr = CaptionCorrector.fit(model, names, feats, lengths, s)
    with pytest.raises(KeyError, match="Did you mean: dog"):
        corr.enhanced_states(feats, lengths, [["dgo"]] * 10)
    with pytest.raises(KeyError, match="numbered 0..2"):
        corr.delta([7])
    with pytest.raises(ValueError, match="no neuron carries topic 'run'"):
        corr.captions(feats, lengths, [["run"]] * 10)
    with pytest.raises(ValueError, match="one list of topics per sample"):
        corr.enhanced_states(feats, lengths, [["dog"]] * 3)
    with pytest.raises(ValueError, match="list of topics"):
        corr.enhanced_states(feats, lengths, ["dog"] * 10)
    with pytest.raises(ValueError, match="references must be"):
        CaptionCorrector(model, names, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="s must be"):
        CaptionCorrector.fit(model, names, feats, lengths, s[:, :2])
    with pytest.raises(ValueError, match="feats must be"):
        corr.captions(feats[..., :4], lengths)
    nan_refs = corr.references.clone()
    nan_refs[1] = float("nan")
    with pytest.raises(ValueError, match="no training video contains topic 'cat'"):
        CaptionCorrector(model, names, nan_refs).delta(["cat"])


def test_caption_mentions_and_study():
    assert caption_mentions("A dog runs.", ["dog", "puppy"]) and not caption_mentions("a dogs run", ["dog"])
    model, names = tiny_model(), tiny_names()
    feats, lengths, s = tiny_data(16)
    train = SimpleNamespace(feats=feats[:8], lengths=lengths[:8], topics=s[:8])
    test = SimpleNamespace(feats=feats[8:], lengths=lengths[8:], topics=s[8:])
    words = [["dog"], ["cat"], ["runs"]]
    before = _state(model)
    out = evaluate_caption_correction(model, names, train, test, words, mu=0.0, steps=5, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())  # the given model is untouched
    caps = model.decode_batch(test.feats, test.lengths, beam=1)
    assert out["captions_before"] == caps
    has = (s[8:] >= 0.1) | (s[8:] == s[8:].max(1, keepdim=True).values)
    n_miss = sum(int(has[n, t]) for n in range(8) for t in (0, 1) if not caption_mentions(caps[n], words[t]))
    assert out["n_misses"] == n_miss > 0
    assert out["n_remark_misses"] + out["n_heldout_misses"] == n_miss
    assert 0.0 <= out["enhancement_fix_rate"] <= 1.0 and 0.0 <= out["remark_fix_rate"] <= 1.0
    changed = {k for k, v in _state(out["model"]).items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("encoder.") for k in changed)
