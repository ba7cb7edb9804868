"""``semlens caption train|evaluate|topics|neurons``: Dong et al.'s interpretable video captioner on an
MSVD-style corpus of precomputed per-frame features (``semlens.world.CaptionCorpus``)."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors

caption_app = typer.Typer(help="Interpretable video captioning: LDA topics, LSTM-B/LSTM-I, coco-caption, PDM.",
                          no_args_is_help=True)


def _corpus(path: Path):
    from semlens.world import CaptionCorpus

    return CaptionCorpus(path)


def _load(model_path: Path, device: str):
    from semlens.captioning.topics import TopicModel
    from semlens.models import load

    model = load("captioner", model_path, device=device)
    topics_path = model_path.with_name(model_path.stem + ".topics.json")
    return model, (TopicModel.load(topics_path) if topics_path.is_file() else None), topics_path


@caption_app.command("topics")
def topics_cmd(
    corpus: Path = typer.Option(..., help="MSVD-style corpus directory (captions.csv, splits/)."),
    topics: int = typer.Option(20, help="Number of LDA topics K."),
    out: Path = typer.Option(None, help="Write the topic model (JSON) here."),
    stop_words: str = typer.Option("", help="Extra stop words, comma-separated (added to English ones)."),
    top: int = typer.Option(8, help="Top words shown per topic."),
    seed: int = typer.Option(0),
) -> None:
    """Fit LDA on the training captions (one document per video) and list the topics by top words."""
    from semlens.captioning.topics import TopicModel

    with user_errors():
        c = _corpus(corpus)
        train = list(c.split("train"))
        extra = [w.strip() for w in stop_words.split(",") if w.strip()]
        tm = TopicModel(topics, extra_stop_words=extra, seed=seed).fit({v: c.captions[v] for v in train})
        for t, words in enumerate(tm.top_words(top)):
            typer.echo(f"topic {t:2d}: {' '.join(words)}")
        if out is not None:
            typer.echo(f"wrote {tm.save(out)}")


@caption_app.command("train")
def train_cmd(
    corpus: Path = typer.Option(..., help="MSVD-style corpus with features/<id>.npy (T, D) per video."),
    out: Path = typer.Option(..., help="Output directory: model.safetensors, model.topics.json, history."),
    lam: float = typer.Option(1.0, help="Interpretive-loss weight λ (0 = LSTM-B, > 0 = LSTM-I)."),
    topics: int = typer.Option(20, help="Number of LDA topics K."),
    epochs: int = typer.Option(20),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    hidden: int = typer.Option(512, help="Encoder LSTM width per direction (D = 2 × hidden neurons)."),
    embed: int = typer.Option(512),
    decoder_hidden: int = typer.Option(512),
    attention: int = typer.Option(256),
    dropout: float = typer.Option(0.5),
    min_count: int = typer.Option(1, help="Vocabulary: keep words seen at least this often in training captions."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    select_every: int = typer.Option(0, help="Every this many epochs, score validation CIDEr (greedy captions) and "
                                     "keep the best weights (0 = keep the last epoch's)."),
    patience: int = typer.Option(None, help="With --select-every: stop after this many evaluations without "
                                 "improvement."),
    topic_dropout: float = typer.Option(0.0, help="LSTM-I: dropout on the mean feature before the topic map f "
                                        "(reproduce dong uses 0.5)."),
    topic_weight_decay: float = typer.Option(0.0, help="LSTM-I: L2 on the topic map f only (reproduce dong "
                                             "uses 0.01)."),
) -> None:
    """Train LSTM-B or LSTM-I; resumes from OUT/checkpoint if it exists."""
    from semlens.captioning import prepare_corpus, train_captioner

    with user_errors():
        prep = prepare_corpus(_corpus(corpus), n_topics=topics, min_count=min_count, seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        model, hist = train_captioner(prep, lam=lam, epochs=epochs, batch_size=batch_size, lr=lr, hidden=hidden,
                                      embed=embed, decoder_hidden=decoder_hidden, attention=attention,
                                      dropout=dropout, seed=seed, device=device, checkpoint_dir=out / "checkpoint",
                                      select_every=select_every, patience=patience, topic_dropout=topic_dropout,
                                      topic_weight_decay=topic_weight_decay)
        path = model.save(out / "model.safetensors")
        prep.topics.save(out / "model.topics.json")
        chosen = f" (weights of epoch {hist[-1]['selected_epoch']}, best validation CIDEr)" if select_every else ""
        typer.echo(f"trained {'LSTM-I' if lam > 0 else 'LSTM-B'}: final caption NLL {hist[-1]['nll']:.3f}, "
                   f"topic loss {hist[-1]['topic']:.4f}{chosen}; wrote {path}")


@caption_app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., help="model.safetensors written by `semlens caption train`."),
    corpus: Path = typer.Option(..., help="MSVD-style features corpus."),
    split: str = typer.Option("test"),
    beam: int = typer.Option(5),
    name: str = typer.Option("ours", help="Row label in the table."),
    device: str = typer.Option("auto"),
) -> None:
    """coco-caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) printed beside the paper's rows."""
    import torch

    from semlens.captioning import evaluate_captioner
    from semlens.captioning.evaluation import format_table, paper_table
    from semlens.captioning.training import CaptionData

    with user_errors():
        m, _, _ = _load(model, device)
        c = _corpus(corpus)
        ids = list(c.split(split))
        if not ids:
            raise ValueError(f"split {split!r} of {corpus} is empty")
        data = CaptionData([torch.as_tensor(c.features(v)) for v in ids], [c.captions[v] for v in ids], m.vocab,
                           max_len=m.config.max_len, video_ids=ids)
        scores = evaluate_captioner(m, data, beam=beam)
        typer.echo("  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        typer.echo(format_table(paper_table({name: scores}, metrics=("BLEU-4", "METEOR", "CIDEr"))))


@caption_app.command("neurons")
def neurons_cmd(
    model: Path = typer.Option(..., help="model.safetensors (model.topics.json next to it)."),
    corpus: Path = typer.Option(..., help="MSVD-style features corpus (its train split is used for PDM)."),
    removal: str = typer.Option("zero", help="How a neuron is removed: zero, mean or marginal."),
    refit_head: bool = typer.Option(True, "--refit-head/--no-refit-head",
                                    help="Name through a topic map fitted on the frozen encoder (semlens' one "
                                         "naming procedure); --no-refit-head: through the model's own f "
                                         "(LSTM-I only, the paper's variant)."),
    top: int = typer.Option(20),
    out: Path = typer.Option(None, help="Write the neuron table here: X.safetensors (with its topic model, for "
                             "`semlens feedback init --names`) or X.json (names, differences, selectivity)."),
    device: str = typer.Option("auto"),
) -> None:
    """Name every neuron of v̄ by prediction-difference maximization; print neuron -> topic and topic -> neurons."""
    from semlens.captioning import analyze_neurons, prepare
    from semlens.captioning.evaluation import format_table
    from semlens.outputs import save_json

    with user_errors():
        m, tm, tpath = _load(model, device)
        if tm is None:
            raise FileNotFoundError(f"topic model {tpath} not found (written by `semlens caption train`)")
        c = _corpus(corpus)
        splits = {s: list(c.split(s)) for s in ("train", "test")}
        ids = splits["train"] + splits["test"]
        prep = prepare({v: c.features(v) for v in ids}, {v: c.captions[v] for v in ids}, splits, vocab=m.vocab,
                       topic_model=tm, max_len=m.config.max_len)
        ana = analyze_neurons(m, prep, refit_head=refit_head, removal=removal)
        names = ana["names"]
        typer.echo(format_table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in names.table(top=top)]))
        typer.echo("")
        typer.echo(format_table(names.topic_table()))
        sel = ana["selectivity"]
        typer.echo(f"\nselectivity (test AUC, mean over {sel['n_topics_scored']} topics): {sel['mean_auc']:.3f}; "
                   f"named neurons: {sel['n_named']} of {m.rep_dim}")
        if out is not None and out.suffix == ".safetensors":  # the stored table `semlens feedback init` reads
            typer.echo(f"wrote {names.save(out, topic_model=tm, model=m)}")
        elif out is not None:
            sel_json = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in sel.items()}
            typer.echo(f"wrote {save_json(names.to_json() | {'selectivity': sel_json}, out)}")


def register(app: typer.Typer) -> None:
    app.add_typer(caption_app, name="caption")
