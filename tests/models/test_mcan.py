"""MCAN: published sizes, forward on both visual inputs, masking, clear errors."""

import dataclasses

import pytest
import torch

from vlcompress.data import VLBatch
from vlcompress.models import build_model
from vlcompress.models.mcan import MCAN
from vlcompress.registry import UnknownComponentError


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_small_matches_published_checkpoint_size():
    # MILVLG's MCAN-small checkpoint: 57,812,491 parameters with a 20,572-word vocabulary
    # and 3,129 answers (no box features).
    assert count(MCAN.from_variant("small", 20572, 3129)) == 57_812_491


@pytest.mark.slow
def test_large_size():
    assert count(MCAN.from_variant("large", 20572, 3129)) == 201_722_891


def region_batch(b=3, n=5, t=6, d=16, vocab=30, boxes=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    ids[0, 4:] = 0
    box = torch.rand(b, n, 2, generator=g) * 0.5
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, n, d, generator=g),
        visual_mask=torch.ones(b, n, dtype=torch.bool),
        boxes=torch.cat([box, box + 0.4], -1) if boxes else None,
    )  # fmt: skip


def test_region_forward_and_padding_invariance():
    torch.manual_seed(0)
    m = build_model("mcan_tiny", 30, 7, use_boxes=True).eval()
    b = region_batch()
    logits = m(b)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    # Adding padded regions (masked out) must not change the answer logits.
    pad = 3
    padded = VLBatch(
        text_ids=b.text_ids, text_mask=b.text_mask,
        visual=torch.cat([b.visual, torch.randn(3, pad, 16)], 1),
        visual_mask=torch.cat([b.visual_mask, torch.zeros(3, pad, dtype=torch.bool)], 1),
        boxes=torch.cat([b.boxes, torch.rand(3, pad, 4)], 1),
    )  # fmt: skip
    torch.testing.assert_close(m(padded), logits, rtol=1e-5, atol=1e-5)
    # Padded question tokens likewise.
    longer = VLBatch(
        text_ids=torch.cat([b.text_ids, torch.zeros(3, 2, dtype=torch.long)], 1),
        text_mask=torch.cat([b.text_mask, torch.zeros(3, 2, dtype=torch.bool)], 1),
        visual=b.visual, visual_mask=b.visual_mask, boxes=b.boxes,
    )  # fmt: skip
    torch.testing.assert_close(m(longer), logits, rtol=1e-5, atol=1e-5)


def test_grid_forward_on_real_batch_and_backward(easy_vqa_batch, easy_vqa_dm):
    m = build_model("mcan_tiny", len(easy_vqa_dm.word_vocab), 13, visual_input="grid")
    logits = m(easy_vqa_batch)
    assert logits.shape == (16, 13)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if not n.startswith("embedding"))


@pytest.mark.parametrize("packing", ["attention", "stack"])
def test_grid_packing_on_real_batch_gives_the_padded_logits(easy_vqa_batch, easy_vqa_dm, packing):
    """Real easy-VQA questions (padded) and a grid image (no padding, packed without a read
    of the device): the packed modes give the padded model's logits and gradients."""
    from vlcompress.kernels.host_syncs import HostSyncCounter

    opts = dict(visual_input="grid", hidden_size=64)
    torch.manual_seed(0)
    padded = build_model("mcan_tiny", len(easy_vqa_dm.word_vocab), 13, **opts).eval()
    packed = build_model("mcan_tiny", len(easy_vqa_dm.word_vocab), 13, packing=packing, **opts)
    packed.load_state_dict(padded.state_dict())
    want = padded(easy_vqa_batch)
    want.square().sum().backward()
    with HostSyncCounter() as count:
        got = packed.eval()(easy_vqa_batch)
        got.square().sum().backward()
    assert count.syncs == 1  # the questions' real tokens, found once
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(padded.named_parameters(), packed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="packing: 'ragged' is not one of"):
        build_model("mcan_tiny", 30, 7, packing="ragged")


def test_the_earlier_packed_attention_option_still_loads():
    """Exports and configs written before ``packing`` carry ``packed_attention``."""
    assert build_model("mcan_tiny", 30, 7, packed_attention=False).options.packing == "padded"
    assert build_model("mcan_tiny", 30, 7, packed_attention=True).options.packing == "attention"
    with pytest.raises(ValueError, match="drop packed_attention"):
        build_model("mcan_tiny", 30, 7, packed_attention=True, packing="stack")


def test_input_kind_mismatch_is_explained(easy_vqa_batch):
    m = build_model("mcan_tiny", 50, 13)  # regions
    with pytest.raises(ValueError, match="expects region features"):
        m(easy_vqa_batch)
    with pytest.raises(ValueError, match="uses box features"):
        build_model("mcan_tiny", 30, 7, use_boxes=True)(region_batch(boxes=False))


def test_bad_options_are_named():
    with pytest.raises(TypeError, match=r"model 'mcan_tiny': unknown option\(s\) \['hiden_size'\]"):
        build_model("mcan_tiny", 30, 7, hiden_size=3)
    with pytest.raises(UnknownComponentError, match="unknown model 'mcan_huge'.*'mcan_large'"):
        build_model("mcan_huge", 30, 7)
    with pytest.raises(ValueError, match="divisible"):
        build_model("mcan_tiny", 30, 7, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="hidden_size: must be >= 1, got -5"):
        build_model("mcan_tiny", 30, 7, hidden_size=-5)
    with pytest.raises(
        ValueError,
        match=r"MCANOptions: visual_input: 'gird' is not one of \['regions', 'grid'\]; "
        r"did you mean 'grid'\?",
    ):
        build_model("mcan_tiny", 30, 7, visual_input="gird")


def test_the_earlier_names_of_the_options_still_work():
    """``MCANConfig`` (before the options were ``MCANOptions``) still imports, deprecated; an
    MCAN pickled with ``config`` loads; ``model.config`` is gone (generic code reads it as a
    Hugging Face configuration)."""
    import pickle

    from vlcompress.models import mcan

    with pytest.deprecated_call():
        from vlcompress.models.mcan import MCANConfig
    assert MCANConfig is mcan.MCANOptions
    model = build_model("mcan_tiny", 30, 7, hidden_size=16)
    assert not hasattr(model, "config")
    model.__dict__["config"] = model.__dict__.pop("options")  # as pickled before the rename
    again = pickle.loads(pickle.dumps(model))
    assert again.options.hidden_size == 16 and "config" not in again.__dict__


def test_grid_cells_mismatch_is_explained(easy_vqa_batch):
    m = build_model("mcan_tiny", 50, 13, visual_input="grid", grid_cells=16)  # (8, 16) makes 16x16
    with pytest.raises(ValueError, match="made 256 cells .* position embeddings for 16"):
        m(easy_vqa_batch)


def test_strided_grid_stem(easy_vqa_batch):
    m = build_model("mcan_tiny", 50, 13, visual_input="grid", grid_pool=False)
    assert m(easy_vqa_batch).shape == (16, 13)


def test_an_export_written_before_the_options_rename_loads(tmp_path):
    """An export records the options as plain values under their field names (no class name),
    so a folder written while the options were ``MCANConfig`` / ``model.config`` loads."""
    import yaml

    from vlcompress.compress.submodels import load_export

    torch.manual_seed(0)
    model = build_model("mcan_tiny", 30, 7, hidden_size=16, num_layers=1).eval()
    old_options = {**dataclasses.asdict(model.options), "grid_channels": [8, 16]}
    old_options.pop("packing")  # older still: packed_attention, before packing existed
    old_options["packed_attention"] = False
    spec = {"model": {"name": "mcan_tiny", "options": old_options},
            "context": {"vocab_size": 30, "num_answers": 7}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(spec))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    again = load_export(tmp_path)
    assert dataclasses.replace(again.options, packed_attention=None) == model.options
    batch = region_batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch), model(batch))


def test_options_pickled_as_mcan_config_load():
    """A pickle naming ``vlcompress.models.mcan.MCANConfig`` (written before the rename)."""
    import pickle

    from vlcompress.models.mcan import MCANOptions

    text = pickle.dumps(MCANOptions(hidden_size=16, num_heads=4), protocol=0)
    old = text.replace(b"\nMCANOptions\n", b"\nMCANConfig\n")
    assert old != text
    with pytest.deprecated_call():
        assert pickle.loads(old) == MCANOptions(hidden_size=16, num_heads=4)


def test_zero_init_residual_starts_every_layer_as_the_identity_and_trains():
    torch.manual_seed(0)
    m = build_model("mcan_tiny", 30, 7, zero_init_residual=True).eval()
    x, y = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    enc, dec = m.encoder[0], m.decoder[0]
    torch.testing.assert_close(enc(x, None), enc.norm2(enc.norm1(x)))
    torch.testing.assert_close(dec(x, y, None, None), dec.norm3(dec.norm2(dec.norm1(x))))
    # the zeroed projections learn: the answer loss reaches them
    m.train()
    m(region_batch()).logsumexp(-1).sum().backward()
    assert dec.guided_attn.out.weight.grad.abs().sum() > 0
    assert enc.ffn.down.weight.grad.abs().sum() > 0
    # the default is PyTorch's initialisation, as published
    plain = build_model("mcan_tiny", 30, 7)
    assert plain.encoder[0].attn.out.weight.abs().sum() > 0


def test_adapter_without_visual_norm_is_bst_gqa_adapter():
    from vlcompress.models.anatomy import anatomy_of

    vqa = build_model("mcan_tiny", 30, 7, width_adapters=True)
    gqa = build_model("mcan_tiny", 30, 7, width_adapters=True, adapter_visual_norm=False)
    assert hasattr(vqa, "visual_norm") and not hasattr(gqa, "visual_norm")
    assert set(dict(vqa.named_parameters())) - set(dict(gqa.named_parameters())) == {
        "visual_norm.weight",
        "visual_norm.bias",
    }
    anatomy_of(gqa).validate(gqa)
    gqa.eval()
    b = region_batch()
    projected = gqa.visual(b.visual, b.boxes)
    torch.testing.assert_close(gqa.encode_visual(b)[0], projected)  # no LayerNorm after it
    assert gqa(b).shape == (3, 7)


def test_identity_adapter_init_passes_the_lstm_output_to_its_layernorm():
    m = build_model("mcan_tiny", 30, 7, width_adapters=True, adapter_init="identity").eval()
    h = torch.randn(2, 5, 32)
    linear, norm = m.lang_adapter
    torch.testing.assert_close(linear(h), h)
    torch.testing.assert_close(m.lang_adapter(h), norm(h))
    narrow = build_model(
        "mcan_tiny", 30, 7, width_adapters=True, adapter_init="identity", lstm_size=16
    )
    assert torch.equal(narrow.lang_adapter[0].weight, torch.eye(32, 16))  # LSTM 16 -> hidden 32
    default = build_model("mcan_tiny", 30, 7, width_adapters=True)
    assert not torch.equal(default.lang_adapter[0].weight, torch.eye(32))


def test_adapter_without_lang_norm_is_the_identity_at_start():
    from vlcompress.models.anatomy import anatomy_of

    m = build_model(
        "mcan_tiny", 30, 7, width_adapters=True, adapter_init="identity", adapter_lang_norm=False
    ).eval()
    assert len(m.lang_adapter) == 1  # the linear layer alone, no LayerNorm after it
    with_norm = build_model("mcan_tiny", 30, 7, width_adapters=True)
    assert set(dict(with_norm.named_parameters())) - set(dict(m.named_parameters())) == {
        "lang_adapter.1.weight",
        "lang_adapter.1.bias",
    }
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(m.lang_adapter(h), h)  # the LSTM output passes unchanged
    anatomy_of(m).validate(m)
    assert m(region_batch()).shape == (3, 7)
