"""Submodel costs, budgeted selection and standalone exports."""

import pytest
import torch

from vlcompress.compress.slimmable import TRIANGLE, Slimmable, Submodel
from vlcompress.compress.submodels import (
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
    assert rows[0]["macs"] < rows[-1]["macs"] and rows[0]["parameters"] < rows[-1]["parameters"]
    for r, acc in zip(rows, [0.5, 0.6, 0.7, 0.75, 0.7, 0.8, 0.85, 0.86, 0.9, 0.91]):
        r["accuracy"] = acc
    best = select(rows, {"macs": rows[6]["macs"]})
    assert best["accuracy"] == max(r["accuracy"] for r in rows if r["macs"] <= rows[6]["macs"])
    assert select(rows, {"parameters": 1e12})["submodel"] == "w1-d1"
    with pytest.raises(ValueError, match="cheapest"):
        select(rows, {"macs": 1})
    with pytest.raises(ValueError, match="no 'latency_b1_ms'"):
        select([{k: v for k, v in r.items() if k != "latency_b1_ms"} for r in rows],
               {"latency_b1_ms": 5})  # fmt: skip
    assert parse_budget("macs=5e8,latency_b1_ms=3") == {"macs": 5e8, "latency_b1_ms": 3.0}
    with pytest.raises(ValueError, match="key one of"):
        parse_budget("gflops=1")

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
