"""Stored artefacts (unit names, neuron → topic tables, concept references): round trips, refusals of files made
for another model, layer or vocabulary, and correction projects that read them instead of recomputing."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from torch import nn

from semlens.artefacts import ArtefactError, content_hash, model_signature
from semlens.captioning.naming import NeuronTopics
from semlens.captioning.topics import TopicModel
from semlens.correct.references import ConceptReferences
from semlens.correct.store import FeedbackStore
from semlens.units.names import UnitNames, save_unit_names


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, width, 3))


def test_unit_names_round_trip_and_refusals(tmp_path):
    net = _net()
    a = UnitNames("2", torch.arange(8), tuple("red green red blue sky red wood -".split()),
                  torch.tensor([0.3, 0.01, 0.2, 0.05, 0.5, 0.041, 0.0, 0.0], dtype=torch.float64), model_signature(net))
    b = UnitNames("0", torch.arange(6), ("x",) * 6, torch.zeros(6, dtype=torch.float64), model_signature(net))
    path = save_unit_names(tmp_path / "names.safetensors", [a, b])
    back = UnitNames.load(path, "2", model=net)
    assert back.concepts == a.concepts and torch.equal(back.ious, a.ious) and torch.equal(back.units, a.units)
    assert back.units_for("red").tolist() == [0, 2, 5]  # IoU order, threshold 0.04 exclusive
    with pytest.raises(ArtefactError, match=r"no names for layer '3'\. Its layers: 0, 2"):
        UnitNames.load(path, "3")
    with pytest.raises(ArtefactError, match="made for another model"):
        UnitNames.load(path, "2", model=_net(width=9))
    with pytest.raises(ValueError, match="several models"):
        save_unit_names(tmp_path / "x.safetensors", [a, UnitNames("1", b.units, b.concepts, b.ious, "other")])
    refs = ConceptReferences(torch.ones(2, 8), torch.tensor([0, 3]), ["-", "red"], "2", model_signature(net))
    refs.save(tmp_path / "refs.safetensors")
    with pytest.raises(ArtefactError, match="is not a semlens unit-names file"):
        UnitNames.load(tmp_path / "refs.safetensors", "2")


def test_references_round_trip_and_refusals(tmp_path):
    net = _net()
    refs = ConceptReferences(torch.tensor([[0.0, 0.0], [1.5, -2.0], [float("nan")] * 2]), torch.tensor([0, 4, 0]),
                             ["-", "red", "sky"], "2", model_signature(net))
    path = refs.save(tmp_path / "r.safetensors")
    assert content_hash(path) == content_hash(refs.save(tmp_path / "again.safetensors"))  # deterministic bytes
    back = ConceptReferences.load(path, model=net, layer="2", names=["-", "red", "sky"])
    torch.testing.assert_close(back.mean, refs.mean, equal_nan=True)
    assert back.reference("red").tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="no reference image contains 'sky'"):
        back.reference("sky")
    with pytest.raises(ArtefactError, match="for layer '2', not '0'"):
        ConceptReferences.load(path, layer="0")
    with pytest.raises(ArtefactError, match="another vocabulary of 3 .*differing: blue, sky"):
        ConceptReferences.load(path, names=["-", "red", "blue"])
    with pytest.raises(ArtefactError, match="another model"):
        ConceptReferences.load(path, model=_net(width=5))


CAPTIONS = {f"v{k}": [f"a {['dog', 'cat', 'bird'][k % 3]} {['runs', 'jumps'][k // 3 % 2]}",
                      f"the {['dog', 'cat', 'bird'][k % 3]} plays"] for k in range(12)}


def test_neuron_table_keeps_its_topic_model_and_refuses_another_vocabulary(tmp_path):
    tm = TopicModel(3, max_iter=5, seed=0).fit(CAPTIONS)
    delta = torch.tensor([[0.2, 0.0, -0.1], [-0.3, -0.1, -0.2], [0.0, 0.4, 0.1], [0.0, 0.0, 0.3]])
    strength, topic = delta.max(1)
    table = NeuronTopics(delta, torch.where(strength > 0, topic, -1), strength, tm.topic_names())
    path = table.save(tmp_path / "t.safetensors", topic_model=tm)
    back = NeuronTopics.load(path, topic_model=tm)
    assert back.topic.tolist() == [0, -1, 1, 2] and back.topic_names == tm.topic_names()
    assert back.neurons_of(1) == [2]
    rebuilt = NeuronTopics.load_topic_model(path)
    assert rebuilt.fingerprint() == tm.fingerprint()
    assert (rebuilt.transform(CAPTIONS) == tm.transform(CAPTIONS)).all()
    other = TopicModel(3, max_iter=5, seed=0).fit({**CAPTIONS, "w": ["a horse gallops far away"]})
    with pytest.raises(ArtefactError, match=r"named with another topic model \(\d+ words"):
        NeuronTopics.load(path, topic_model=other)
    with pytest.raises(ValueError, match="the topic model has 3 topics; the table names 2"):
        NeuronTopics(delta[:, :2], topic.clamp(max=1), strength, ["a", "b"]).save(tmp_path / "u.safetensors", tm)


def test_schema_1_store_gains_the_artefact_column(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE versions (id INTEGER PRIMARY KEY, parent INTEGER, state TEXT NOT NULL, weights TEXT,
            sha256 TEXT, job TEXT UNIQUE, params TEXT NOT NULL DEFAULT '{}', note TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL);
        INSERT INTO versions VALUES (1, NULL, 'ready', NULL, NULL, NULL, '{}', 'base', '2026-01-01');
    """)
    con.close()
    store = FeedbackStore(db_path=db)
    assert store.version(1).artefacts == {} and store.version(1).note == "base"
    w = tmp_path / "w.bin"
    w.write_bytes(b"weights")
    v = store.register_base(w, artefacts={"names": "ab", "references": "cd"})
    assert store.version(v.id).artefacts == {"names": "ab", "references": "cd"}
