"""Submodel costs, budgeted selection and standalone exports."""

import re

import pytest
import torch

from vlcompress.compress.slimmable import TRIANGLE, Slimmable, Submodel
from vlcompress.compress.submodels import (
    ExportedModel,
    latency_spread_problems,
    load_export,
    parse_budget,
    profile_submodels,
    save_export,
    select,
)
from vlcompress.data import VLBatch
from vlcompress.models import build_model
from vlcompress.utils.flops import count_compute, resize_batch


def setup():
    torch.manual_seed(0)
    m = build_model("mcan_tiny", 30, 7, width_adapters=True, num_layers=6, num_heads=4).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (4, 6), generator=g)
    b = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(4, 5, 16, generator=g),
                visual_mask=torch.ones(4, 5, dtype=torch.bool))  # fmt: skip
    return m, b


def test_count_compute_sees_attention_and_lstm():
    m, b = setup()
    one = resize_batch(b, 1)
    c = count_compute(m, one)
    assert c.flops == 2 * c.macs
    # attention: per block 2 products of (heads x Lq x Lk x head_dim); MCAN tiny: 4 heads of 8
    enc = 6 * 2 * 4 * 6 * 6 * 8  # 6 encoder layers, 6 tokens
    dec = 6 * 2 * 4 * (5 * 5 + 5 * 6) * 8  # 6 decoder layers: self over 5 regions, guided to 6
    assert c.attention_macs == enc + dec
    lstm = 6 * 4 * 32 * (16 + 32)  # 6 steps, 4 gates, hidden 32, input 16
    linear_only = count_compute(m.classifier, torch.randn(1, 64)).macs
    assert linear_only == 64 * 7
    assert c.macs > enc + dec + lstm


def test_profile_select_and_export_roundtrip(tmp_path):
    m, b = setup()
    slim = Slimmable(m)
    rows = profile_submodels(slim, TRIANGLE, resize_batch(b, 1), b, repeats=2)
    assert [r["submodel"] for r in rows] == [s.name for s in TRIANGLE]
    assert all(r["latency_b1_ms"] > 0 and r["latency_large_ms"] > 0 for r in rows)
    for r in rows:  # median and spread of the repeated calls
        for key in ("latency_b1", "latency_large"):
            assert r[f"{key}_p10_ms"] <= r[f"{key}_ms"] <= r[f"{key}_p90_ms"]
    assert rows[0]["macs"] < rows[-1]["macs"] and rows[0]["parameters"] < rows[-1]["parameters"]
    for r, acc in zip(rows, [0.5, 0.6, 0.7, 0.75, 0.7, 0.8, 0.85, 0.86, 0.9, 0.91]):
        r["accuracy"] = acc
    best = select(rows, {"macs": rows[6]["macs"]})
    assert best["accuracy"] == max(r["accuracy"] for r in rows if r["macs"] <= rows[6]["macs"])
    assert select(rows, {"parameters": 1e12})["submodel"] == "w1-d1"
    smallest = re.escape(f"smallest achievable: macs={rows[0]['macs']:.4g} (w1/4-d1/6)")
    with pytest.raises(ValueError, match=smallest):
        select(rows, {"macs": 1})
    with pytest.raises(ValueError, match="no 'latency_b1_ms'"):
        select([{k: v for k, v in r.items() if k != "latency_b1_ms"} for r in rows],
               {"latency_b1_ms": 5})  # fmt: skip
    assert parse_budget("macs=5e8,latency_b1_ms=3") == {"macs": 5e8, "latency_b1_ms": 3.0}
    with pytest.raises(ValueError, match="unknown key 'gflops' \\(did you mean 'flops'\\?\\)"):
        parse_budget("gflops=1")
    for bad, problem in (("macs=-1", "not a positive number"), ("macs=1,macs=2", "twice"),
                         ("macs", "write key=value"), ("", "empty budget")):  # fmt: skip
        with pytest.raises(ValueError, match=problem):
            parse_budget(bad)

    sub = Submodel(0.5, 1 / 3)
    small = slim.export(sub, b)
    folder = save_export(small, tmp_path / "exp", model_name="mcan_tiny",
                         context={"vocab_size": 30, "num_answers": 7}, record={"submodel": sub.name})  # fmt: skip
    slim.detach()  # the model is plain again: loading the export needs nothing from slimming
    again = load_export(folder)
    with Slimmable(m).submodel(sub):
        torch.testing.assert_close(again(b), m(b), rtol=0, atol=0)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_export(tmp_path)


def test_latency_spread_problems_flag_wide_spreads_only():
    rows = [
        {"submodel": "a", "latency_b1_ms": 2.0, "latency_b1_p10_ms": 1.9, "latency_b1_p90_ms": 2.2},
        {"submodel": "b", "latency_b1_ms": 2.0, "latency_b1_p10_ms": 1.0, "latency_b1_p90_ms": 9.0,
         "latency_large_ms": 5.0, "latency_large_p10_ms": 4.0, "latency_large_p90_ms": 7.0},
        {"submodel": "c", "macs": 5},  # not measured: nothing to say
    ]  # fmt: skip
    assert latency_spread_problems(rows) == [
        "b latency_b1_ms 1-9 ms (x9)",
        "b latency_large_ms 4-7 ms (x1.75)",
    ]
    assert latency_spread_problems(rows, keys=["latency_large_ms"], limit=2.0) == []


def test_exported_model_answers_from_its_own_vocabulary(tmp_path):
    m, b = setup()
    sub = Submodel(0.5, 1 / 3)
    slim = Slimmable(m)
    small = slim.export(sub, b)
    words = ["<pad>", "<unk>", *(f"w{i}" for i in range(2, 30))]
    answers = [f"a{i}" for i in range(7)]
    inputs = {"answers": answers, "text_encoding": "words", "max_question_len": 6,
              "visual_input": "regions", "visual_shape": [5, 16], "words": words}  # fmt: skip
    save_export(small, tmp_path, model_name="mcan_tiny", context={"vocab_size": 30, "num_answers": 7},
                record={"submodel": sub.name}, inputs=inputs)  # fmt: skip
    exported = ExportedModel.load(tmp_path)
    # the question strings of the batch's ids: encoded back to the same ids
    questions = [" ".join(words[i] for i in row) for row in b.text_ids.tolist()]
    assert torch.equal(exported.encode_questions(questions), b.text_ids)
    assert torch.equal(
        exported.encode_questions(["W3, w4 unknown?"])[0, :3], torch.tensor([3, 4, 1])
    )
    with torch.no_grad(), slim.submodel(sub):
        expected = [answers[i] for i in m(b).argmax(-1).tolist()]
    assert exported.predict(questions, b.visual) == expected
    with pytest.raises(ValueError, match="reads regions features"):
        exported.predict(questions, [None] * 4)
    with pytest.raises(ValueError, match="trained on \\(5, 16\\)"):
        exported.predict(questions, b.visual[:, :3])
    with pytest.raises(ValueError, match="needs inputs\\['words'\\]"):
        save_export(small, tmp_path / "x", model_name="mcan_tiny", context={"vocab_size": 30, "num_answers": 7},
                    record={}, inputs={**inputs, "words": None})  # fmt: skip
