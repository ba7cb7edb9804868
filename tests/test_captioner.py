"""Attentive captioner, interpretive loss and caption trainer."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from semlens.captioning.model import (
    BOS,
    EOS,
    PAD,
    AttentiveCaptioner,
    CaptionerConfig,
    Vocabulary,
    VocabularyMismatchError,
    pad_features,
)
from semlens.captioning.training import (
    CaptionData,
    CaptionTrainConfig,
    CaptionTrainer,
    caption_nll,
    fit_topic_head,
    validation_cider,
)
from semlens.checkpoint import CheckpointError

CAPS = ["a dog runs", "a cat sleeps", "the dog sleeps", "a cat runs fast"]


def small_model(seed: int = 0, words=None, **kw) -> AttentiveCaptioner:
    torch.manual_seed(seed)
    vocab = Vocabulary(words) if words is not None else Vocabulary.build(CAPS)
    cfg = CaptionerConfig(feature_dim=6, vocab=vocab.words, n_topics=3, hidden=8, embed=8, decoder_hidden=10,
                          attention=7, dropout=0.0, max_len=6, **kw)
    return AttentiveCaptioner(cfg).eval()


def test_vocabulary_roundtrip():
    v = Vocabulary.build(CAPS + ["A DOG!"], min_count=2)
    assert v.words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and "fast" not in v.index
    ids = v.encode("A dog, runs fast.")
    assert ids[0] == BOS and ids[-1] == EOS and ids[-2] == 3  # "fast" -> <unk>
    assert v.decode(ids) == "a dog runs <unk>"
    with pytest.raises(ValueError, match="no words"):
        v.encode(" ,. ")


def test_padded_batches_do_not_change_outputs():
    model = small_model()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(t, 6, generator=g) for t in (3, 6, 1, 4)]
    feats, lengths = pad_features(seqs)
    feats[0, 3:] = 1e3 * torch.randn(3, 6, generator=g)  # garbage in padded frames must not matter
    feats[2, 1:] = -7.0
    tok = torch.tensor([[BOS, 4, 5, EOS, PAD, PAD], [BOS, 6, EOS, PAD, PAD, PAD],
                        [BOS, 4, 6, 7, 5, EOS], [BOS, 5, EOS, PAD, PAD, PAD]])
    logits, v, mask = model(feats, lengths, tok)
    nll = caption_nll(logits, tok[:, 1:])
    greedy = model.greedy(feats, lengths)
    beam = model.beam_search(feats, lengths, beam=3)
    for k, s in enumerate(seqs):
        L = int((tok[k] != PAD).sum())
        lo1, v1, _ = model(s[None], torch.tensor([s.shape[0]]), tok[k: k + 1, :L])
        torch.testing.assert_close(v[k, : s.shape[0]], v1[0], atol=1e-6, rtol=1e-5)
        assert (v[k, s.shape[0]:] == 0).all() and mask[k].sum() == s.shape[0]
        torch.testing.assert_close(logits[k, : L - 1], lo1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nll[k], caption_nll(lo1, tok[k: k + 1, 1:L])[0], atol=1e-5, rtol=1e-5)
        g1 = model.greedy(s[None], torch.tensor([s.shape[0]]))[0]
        assert greedy[k, : len(g1)].tolist() == g1.tolist()
        b1 = model.beam_search(s[None], torch.tensor([s.shape[0]]), beam=3)[0]
        assert beam[k, : len(b1)].tolist() == b1.tolist()


def test_beam_one_equals_greedy_and_wide_beam_is_exact():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(6, 5, 6, generator=g)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    for seed in range(3):
        model = small_model(seed)
        with torch.no_grad():  # sharpen the decoder so sequences end at different steps
            model.out.weight.mul_(8.0)
        a, b = model.greedy(feats, lengths), model.beam_search(feats, lengths, beam=1)
        assert a.shape == b.shape and torch.equal(a, b)

    # brute force over all sequences of <= 3 steps on a 2-word vocabulary: a beam as wide as the
    # number of prefixes must find the most probable one.
    model = small_model(1, words=["x", "y"])
    with torch.no_grad():
        model.out.weight.mul_(3.0)
    V, steps = len(model.vocab), 3
    seqs = []  # sequences ending with EOS, or of full length; PAD/BOS are never generated
    for n in range(1, steps + 1):
        for body in itertools.product(range(EOS, V), repeat=n):
            if EOS in body[:-1] or (n < steps and body[-1] != EOS):
                continue
            seqs.append(list(body))
    x, ln = feats[:2], lengths[:2]
    best = model.beam_search(x, ln, beam=V * V, max_len=steps)
    for k in range(2):
        scores = []
        for s in seqs:
            tok = torch.tensor([[BOS, *s]])
            lo, _, _ = model(x[k: k + 1, : ln[k]], ln[k: k + 1], tok)
            scores.append(torch.log_softmax(lo, -1)[0, torch.arange(len(s)), torch.tensor(s)].sum())
        top = seqs[int(torch.stack(scores).argmax())]
        got = [t for t in best[k].tolist() if t != PAD]
        assert got == top


def test_save_load_and_vocabulary_mismatch(tmp_path):
    model = small_model()
    path = model.save(tmp_path / "cap.safetensors")
    back = AttentiveCaptioner.load(path, vocab=model.vocab)
    x, ln = torch.randn(2, 4, 6), torch.tensor([4, 2])
    assert torch.equal(model.greedy(x, ln), back.greedy(x, ln))
    with pytest.raises(VocabularyMismatchError, match="different vocabulary"):
        AttentiveCaptioner.load(path, vocab=Vocabulary.build(CAPS + ["a horse jumps"]))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        AttentiveCaptioner.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="feats must be"):
        model.greedy(torch.randn(2, 4, 5), ln)
    with pytest.raises(ValueError, match="NaN"):
        model.greedy(torch.full((2, 4, 6), float("nan")), ln)


def toy_data(vocab: Vocabulary, n: int = 24, seed: int = 0) -> CaptionData:
    """Videos whose features encode which of two captions describe them."""
    g = torch.Generator().manual_seed(seed)
    feats, caps, topics = [], [], []
    for k in range(n):
        c = k % 2
        f = torch.randn(4, 6, generator=g) * 0.1
        f[:, c] += 1.0
        feats.append(f)
        caps.append([CAPS[c], CAPS[c + 2]])
        topics.append([0.8, 0.1, 0.1] if c == 0 else [0.1, 0.1, 0.8])
    return CaptionData(feats, caps, vocab, torch.tensor(topics), max_len=6)


def test_trainer_learns_resumes_exactly_and_interpretive_loss_works(tmp_path):
    model = small_model()
    data = toy_data(model.vocab)
    cfg = CaptionTrainConfig(epochs=2, batch_size=8, lr=1e-2, lam=1.0, seed=0, device="cpu")
    full = CaptionTrainer(model, data, cfg).fit()
    # interrupted run: 1 epoch, then a new trainer resumes for the second
    m2 = small_model()
    CaptionTrainer(m2, data, CaptionTrainConfig(**{**cfg.__dict__, "epochs": 1}), checkpoint_dir=tmp_path).fit()
    m3 = small_model(seed=5)  # different init: must be overwritten by the checkpoint
    hist = CaptionTrainer(m3, data, cfg, checkpoint_dir=tmp_path).fit()
    assert [h["epoch"] for h in hist] == [0, 1]
    for (k, a), b in zip(model.state_dict().items(), m3.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    assert full[1]["loss"] == pytest.approx(hist[1]["loss"], rel=1e-5)
    with pytest.raises(VocabularyMismatchError):
        CaptionTrainer(small_model(words=["cat", "dog"]), CaptionData(data.feats.unbind(0), data.captions,
                       Vocabulary(["cat", "dog"]), data.topics), cfg, checkpoint_dir=tmp_path).fit()

    # longer: captions are learned, λ > 0 drives f(v̄) to s, λ = 0 leaves it
    runs = {}
    for lam in (0.0, 3.0):
        m = small_model()
        h = CaptionTrainer(m, data, CaptionTrainConfig(epochs=12, batch_size=8, lr=1e-2, lam=lam, device="cpu")).fit()
        runs[lam] = (m, h)
    m, h = runs[3.0]
    assert h[-1]["nll"] < 0.5 * h[0]["nll"]
    assert h[-1]["topic"] < 0.2 * runs[0.0][1][-1]["topic"]
    x, ln = data.video_batch(torch.arange(4), torch.device("cpu"))
    out = m.decode_batch(x, ln, beam=2)
    assert out[0] in (CAPS[0], CAPS[2]) and out[1] in (CAPS[1], CAPS[3]) and out[2] in (CAPS[0], CAPS[2])
    # post-hoc f for LSTM-B: fits the topics without touching the encoder
    mb = runs[0.0][0]
    enc = {k: v.clone() for k, v in mb.encoder.state_dict().items()}
    assert fit_topic_head(mb, data, steps=200) < 0.05
    assert all(torch.equal(v, mb.encoder.state_dict()[k]) for k, v in enc.items())


def test_caption_trainer_is_the_one_trainer_and_equals_the_plain_loop(tmp_path):
    """CaptionTrainer = Trainer + CaptionStep + InterpretiveLoss + CaptionBatches: the same weights as the plain
    loop it replaced (order and dropout seeded per (seed, epoch), Adam with f in its own group, clipping)."""
    from semlens.captioning.training import caption_nll, topic_loss
    from semlens.train import Trainer

    data = toy_data(small_model().vocab)
    cfg = CaptionTrainConfig(epochs=3, batch_size=8, lr=1e-2, lam=2.0, captions_per_video=1, weight_decay=1e-4,
                             topic_weight_decay=0.1, seed=4, device="cpu")
    model = small_model(topic_dropout=0.5)
    tr = CaptionTrainer(model, data, cfg, checkpoint_dir=tmp_path)
    assert isinstance(tr.trainer, Trainer)
    hist = tr.fit()
    ref = small_model(topic_dropout=0.5)
    head = {id(p) for p in ref.topic_head.parameters()}
    opt = torch.optim.Adam([{"params": [p for p in ref.parameters() if id(p) not in head]},
                            {"params": list(ref.topic_head.parameters()), "weight_decay": 1e-4 + 0.1}],
                           lr=1e-2, weight_decay=1e-4)
    ref.train()
    for epoch in range(3):
        g = torch.Generator().manual_seed(4 * 100_003 + epoch)
        torch.manual_seed(4 * 100_003 + epoch)
        order = torch.randperm(data.n_pairs, generator=g)
        order = order[data.first_per_video(order, 1)]
        assert len(order) == data.n_videos
        for s in range(0, len(order), 8):
            feats, lengths, tok, topics = data.batch(order[s: s + 8], torch.device("cpu"))
            logits, v, mask = ref(feats, lengths, tok)
            pred = ref.topics(ref.mean_rep(v, mask))
            loss = caption_nll(logits, tok[:, 1:]).mean() + 2.0 * topic_loss(pred, topics).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
            opt.step()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert list(hist[0]) == ["loss", "nll", "topic", "epoch", "seconds", "clips_per_s", "lam_topic"]
    assert hist[0]["lam_topic"] == 2.0 * hist[0]["topic"] and hist[-1]["epoch"] == 2
    # the trainer's checkpoint format; last.safetensors is a captioner file; history.json for people
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "last.pt", "last.safetensors"]
    for (k, a), b in zip(AttentiveCaptioner.load(tmp_path / "last.safetensors", vocab=model.vocab).state_dict().items(),
                         model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [0, 1, 2]
    # a checkpoint of the former caption trainer (last_optim.pt, no last.pt) is refused, not half-resumed
    (tmp_path / "last.pt").rename(tmp_path / "last_optim.pt")
    with pytest.raises(CheckpointError, match="last.pt"):
        CaptionTrainer(small_model(topic_dropout=0.5), data, cfg, checkpoint_dir=tmp_path).fit()


def test_topic_regularisers_dropout_and_weight_decay(tmp_path):
    model = small_model(topic_dropout=0.5)
    vbar = torch.randn(5, 16)
    plain = torch.softmax(model.topic_head(vbar), -1)
    torch.testing.assert_close(model.topics(vbar), plain)  # eval mode: no dropout (PDM, selectivity)
    model.train()
    torch.manual_seed(3)
    got = model.topics(vbar)
    torch.manual_seed(3)
    ref = torch.softmax(model.topic_head(torch.nn.functional.dropout(vbar, 0.5, training=True)), -1)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, plain)
    model.eval().save(tmp_path / "m.safetensors")
    assert AttentiveCaptioner.load(tmp_path / "m.safetensors").config.topic_dropout == 0.5
    with pytest.raises(ValueError, match="topic_dropout"):
        small_model(topic_dropout=1.0)
    # L2 on f only: its own parameter group; a larger decay gives a smaller W_f
    data = toy_data(small_model().vocab)
    norms = {}
    for twd in (0.0, 0.5):
        m = small_model()
        tr = CaptionTrainer(m, data, CaptionTrainConfig(epochs=6, batch_size=8, lr=1e-2, lam=3.0, device="cpu",
                                                        weight_decay=1e-4, topic_weight_decay=twd))
        assert [g["weight_decay"] for g in tr.optim.param_groups] == [1e-4, 1e-4 + twd]
        assert {id(p) for p in tr.optim.param_groups[1]["params"]} == {id(p) for p in m.topic_head.parameters()}
        tr.fit()
        norms[twd] = float(m.topic_head.weight.detach().norm())
    assert norms[0.5] < 0.8 * norms[0.0]
    with pytest.raises(ValueError, match="weight decays"):
        CaptionTrainer(small_model(), data, CaptionTrainConfig(topic_weight_decay=-1.0))


def test_caption_data_bad_input():
    vocab = Vocabulary.build(CAPS)
    with pytest.raises(ValueError, match="inconsistent feature dimensions"):
        CaptionData([torch.zeros(3, 6), torch.zeros(3, 5)], [["a dog"], ["a cat"]], vocab)
    with pytest.raises(ValueError, match="'v2'.*no words"):
        CaptionData([torch.zeros(3, 6)] * 2, [["a dog"], [""]], vocab, video_ids=["v1", "v2"])
    with pytest.raises(ValueError, match="no captions"):
        CaptionData([torch.zeros(3, 6)] * 2, [["a dog"], []], vocab)
    with pytest.raises(ValueError, match="finite"):
        CaptionData([torch.full((3, 6), float("nan"))], [["a dog"]], vocab)
    model = small_model()
    with pytest.raises(ValueError, match="dimension 5"):
        CaptionTrainer(model, CaptionData([torch.zeros(3, 5)], [["a dog"]], vocab), CaptionTrainConfig())


def test_captions_per_video_sampling():
    vocab = Vocabulary.build(CAPS)
    data = CaptionData([torch.zeros(2, 6)] * 3, [CAPS[:3], CAPS[:1], CAPS], vocab)
    order = torch.randperm(data.n_pairs, generator=torch.Generator().manual_seed(0))
    keep = order[data.first_per_video(order, 2)]
    counts = torch.bincount(data.owner[keep], minlength=3)
    assert counts.tolist() == [2, 1, 2]
    # the kept sentences are each video's first ones in the shuffled order
    for v in range(3):
        first = [int(i) for i in order if data.owner[i] == v][:2]
        assert sorted(first) == sorted(int(i) for i in keep if data.owner[i] == v)


def test_model_selection_restores_best_validation_weights_and_resumes(tmp_path):
    vocab = Vocabulary.build(CAPS)
    data, val = toy_data(vocab), toy_data(vocab, n=8, seed=1)
    cfg = CaptionTrainConfig(epochs=5, batch_size=8, lr=3e-2, lam=1.0, seed=0, device="cpu", select_every=1)
    model = small_model()
    tr = CaptionTrainer(model, data, cfg, val=val)
    hist = tr.fit()
    scores = [h["val_CIDEr"] for h in hist]
    assert len(scores) == 5 and tr.best_epoch == scores.index(max(scores))
    # the model holds the best epoch's weights: its validation CIDEr is the best one logged
    assert validation_cider(model, val) == pytest.approx(max(scores), abs=1e-9)
    assert not model.training
    # ... and exactly the weights of a run stopped after that epoch
    plain = small_model()
    CaptionTrainer(plain, data, CaptionTrainConfig(**{**cfg.__dict__, "epochs": tr.best_epoch + 1,
                                                      "select_every": 0})).fit()
    assert tr.best_epoch < 4  # the toy run peaks before its last epoch, so restoring is not a no-op
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    # interrupted after 2 epochs, resumed: same history and same selected weights
    CaptionTrainer(small_model(), data, CaptionTrainConfig(**{**cfg.__dict__, "epochs": 2}), val=val,
                   checkpoint_dir=tmp_path).fit()
    m2 = small_model(seed=3)
    tr2 = CaptionTrainer(m2, data, cfg, val=val, checkpoint_dir=tmp_path)
    hist2 = tr2.fit()
    assert [h["val_CIDEr"] for h in hist2] == pytest.approx(scores, abs=1e-9)
    assert tr2.selected_epoch == tr.best_epoch
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    # patience: training stops once `patience` evaluations in a row fail to improve
    tr3 = CaptionTrainer(small_model(), data, CaptionTrainConfig(**{**cfg.__dict__, "epochs": 12, "patience": 1,
                                                                   "lr": 1e-4}), val=val)
    h3 = tr3.fit()
    assert len(h3) == 12 or len(h3) == tr3.best_epoch + 2
    best = max(h["val_CIDEr"] for h in h3)
    assert all(h["val_CIDEr"] <= best for h in h3) and tr3.best_score == best
    with pytest.raises(ValueError, match="needs validation data"):
        CaptionTrainer(small_model(), data, cfg)
    with pytest.raises(ValueError, match="patience"):
        CaptionTrainer(small_model(), data, CaptionTrainConfig(select_every=1, patience=0), val=val)


def test_validation_cider_matches_pycocoevalcap_on_decoded_captions():
    from pycocoevalcap.cider.cider import Cider

    vocab = Vocabulary.build(CAPS)
    val = toy_data(vocab, n=6, seed=2)
    model = small_model()
    x, ln = val.video_batch(torch.arange(6), torch.device("cpu"))
    cands = model.decode_batch(x, ln, beam=1)
    want = Cider().compute_score({k: val.captions[k] for k in range(6)},
                                 {k: [c or "<empty>"] for k, c in enumerate(cands)})[0]
    assert validation_cider(model, val) == pytest.approx(want, abs=1e-12)


def test_fit_topic_head_on_a_copy_with_weight_decay_and_validation_stopping():
    model = small_model()
    data, val = toy_data(model.vocab), toy_data(model.vocab, n=8, seed=1)
    # held-out topic mixtures are softer than the training ones: fitting the training set to the end overfits
    val = CaptionData(list(val.feats.unbind(0)), val.captions, model.vocab, 0.4 * val.topics + 0.2, max_len=6)
    own = model.topic_head.weight.clone()
    heads = {}
    for name, kw in (("plain", {}), ("wd", {"weight_decay": 1e-1}), ("val", {"val": val, "eval_every": 5})):
        heads[name] = torch.nn.Linear(16, 3)
        fit_topic_head(model, data, steps=100, head=heads[name], **kw)
    assert torch.equal(model.topic_head.weight, own)  # the model's own f is untouched
    assert heads["wd"].weight.norm() < heads["plain"].weight.norm()  # the L2 penalty shrinks W
    from semlens.captioning.training import mean_representations, topic_loss

    vv = mean_representations(model, val)

    def val_loss(h):
        with torch.no_grad():
            return float(topic_loss(torch.softmax(h(vv), -1), val.topics).mean())

    # the kept head is the best of the evaluated steps: same as re-running for k steps, k = 5, 10, ..., 100
    by_steps = []
    for k in range(5, 101, 5):
        h = torch.nn.Linear(16, 3)
        fit_topic_head(model, data, steps=k, head=h)
        by_steps.append(val_loss(h))
    assert val_loss(heads["val"]) == pytest.approx(min(by_steps), abs=1e-6)
    assert min(by_steps) < by_steps[-1]  # the toy head overfits: stopping early matters here
    with pytest.raises(ValueError, match="need 16 -> 3"):
        fit_topic_head(model, data, head=torch.nn.Linear(5, 3))
