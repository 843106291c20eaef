"""ViLT: the published sizes and layout (logits equal to transformers' ViltForQuestionAnswering
and ViltForImagesAndTextClassification on the same weights), pairs, MiniLM, errors, anatomy."""

import pytest
import torch
from fit_steps import bce_losses
from safetensors.torch import load_file

from vlcompress.data import VLBatch
from vlcompress.models import Modality, anatomy_of, build_model
from vlcompress.models.vilt import VILT_VARIANTS, save_vilt_folder
from vlcompress.utils.assets import minilm_package_dir

TINY = VILT_VARIANTS["vilt_tiny"]


def batch(b=3, t=7, vocab=50, images=1, size=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    ids[0, 5:] = 0
    shape = (b, 3, size, size) if images == 1 else (b, images, 3, size, size)
    return VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.rand(shape, generator=g))


def hf_config(**extra):
    from transformers import ViltConfig

    return ViltConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, patch_size=16,
                      image_size=64, **extra)  # fmt: skip


def test_b32_backbone_has_the_published_size():
    from transformers import ViltConfig, ViltModel

    m = build_model("vilt_b32", 30522, 3129)
    body = sum(p.numel() for p in m.vilt.parameters())
    assert body == 111_595_008 == sum(p.numel() for p in ViltModel(ViltConfig()).parameters())
    shapes = [tuple(p.shape) for p in m.classifier.parameters()]
    assert shapes == [(1536, 768), (1536,), (1536,), (1536,), (3129, 1536), (3129,)]
    pair = build_model("vilt_b32", 30522, 2, head="pair")
    assert pair.vilt.embeddings.token_type_embeddings.weight.shape == (3, 768)
    assert tuple(pair.classifier[0].weight.shape) == (1536, 1536)


def test_a_dandelin_vqa_folder_loads_and_gives_transformers_logits(tmp_path):
    from transformers import ViltForQuestionAnswering

    torch.manual_seed(0)
    hf = ViltForQuestionAnswering(hf_config(num_labels=5)).eval()
    hf.save_pretrained(tmp_path / "vqa")  # the hub layout: config.json + model.safetensors
    ours = build_model("vilt_tiny", 50, 5, pretrained=str(tmp_path / "vqa")).eval()
    b = batch()
    with torch.no_grad():
        theirs = hf(input_ids=b.text_ids, attention_mask=b.text_mask.long(),
                    pixel_values=(b.visual - 0.5) / 0.5).logits  # fmt: skip
        logits, extras = ours(b, return_extras=True)
    torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=1e-4)
    assert extras["pooled"].shape == (3, 32) and extras["question"].shape == (3, 32)
    # Padding columns of the text do not change the answer.
    wide = VLBatch(text_ids=torch.cat([b.text_ids, torch.zeros(3, 4, dtype=torch.long)], 1),
                   text_mask=torch.cat([b.text_mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
                   visual=b.visual)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(ours(wide), logits)


def test_a_dandelin_nlvr2_folder_loads_and_gives_transformers_logits(tmp_path):
    from transformers import ViltForImagesAndTextClassification

    torch.manual_seed(0)
    config = hf_config(num_images=2, modality_type_vocab_size=3, num_labels=2)
    hf = ViltForImagesAndTextClassification(config).eval()
    hf.save_pretrained(tmp_path / "nlvr2")
    ours = build_model("vilt_tiny", 50, 2, head="pair", pretrained=str(tmp_path / "nlvr2")).eval()
    assert ours.reads_pairs
    b = batch(images=2)
    with torch.no_grad():
        theirs = hf(input_ids=b.text_ids, attention_mask=b.text_mask.long(),
                    pixel_values=(b.visual - 0.5) / 0.5).logits  # fmt: skip
        logits, extras = ours(b, return_extras=True)
    torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=1e-4)
    assert extras["pooled"].shape == (3, 64)
    # Swapping the images changes the reading (types 1 and 2 differ).
    swapped = VLBatch(text_ids=b.text_ids, text_mask=b.text_mask, visual=b.visual.flip(1))
    with torch.no_grad():
        assert not torch.allclose(ours(swapped), logits)


def test_an_mlm_folder_starts_a_pair_model_with_the_type_table_grown(tmp_path, caplog):
    from transformers import ViltForMaskedLM

    torch.manual_seed(0)
    ViltForMaskedLM(hf_config()).save_pretrained(tmp_path / "mlm")
    mlm = load_file(str(tmp_path / "mlm" / "model.safetensors"))
    with caplog.at_level("INFO"):
        ours = build_model("vilt_tiny", 50, 2, head="pair", pretrained=str(tmp_path / "mlm"))
    table = ours.vilt.embeddings.token_type_embeddings.weight
    old = mlm["vilt.embeddings.token_type_embeddings.weight"]
    assert torch.equal(table[:2], old) and torch.equal(table[2], old[1])
    assert torch.equal(ours.vilt.encoder.layer[1].output.dense.weight,
                       mlm["vilt.encoder.layer.1.output.dense.weight"])  # fmt: skip
    assert "grown to 3 rows" in caplog.text and "mlm_score" in caplog.text


def test_a_saved_folder_reloads_exactly_and_another_answer_set_gets_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    m = build_model("vilt_tiny", 50, 13).eval()
    save_vilt_folder(m, tmp_path / "mini")
    again = build_model("vilt_tiny", 50, 13, pretrained=str(tmp_path / "mini")).eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(b), m(b))
    other = build_model("vilt_tiny", 50, 7, pretrained=str(tmp_path / "mini"))
    assert torch.equal(other.vilt.pooler.dense.weight, m.vilt.pooler.dense.weight)
    assert other.classifier[3].weight.shape == (7, 64)


def test_buffers_of_older_transformers_are_ignored_and_pairs_read_out_both_passes(tmp_path):
    from safetensors.torch import save_file

    m = build_model("vilt_tiny", 50, 2, head="pair").eval()
    folder = save_vilt_folder(m, tmp_path / "old")
    state = load_file(str(folder / "model.safetensors"))
    state["vilt.embeddings.text_embeddings.position_ids"] = torch.arange(32)[None]  # 4.13 saved it
    save_file(state, str(folder / "model.safetensors"))
    again = build_model("vilt_tiny", 50, 2, head="pair", pretrained=str(folder)).eval()
    b = batch(images=2)
    an = again.anatomy()
    with torch.no_grad(), an.capture(again, ["fused"]) as seen:
        logits = again(b)
    assert seen["fused"].shape == (3, 64)  # both passes, the classifier's input
    with torch.no_grad():
        torch.testing.assert_close(logits, m(b))


def test_bad_checkpoints_inputs_and_options_are_explained(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"ViLT checkpoint folder .* lacks \['config.json'.*dandelin"
    ):
        build_model("vilt_tiny", 50, 13, pretrained=str(tmp_path))
    save_vilt_folder(build_model("vilt_tiny", 50, 13), tmp_path / "t")
    with pytest.raises(ValueError, match=r"hidden_size: checkpoint 32, model 64"):
        build_model("vilt_tiny", 50, 13, hidden_size=64, pretrained=str(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"vocab_size: checkpoint 50, data 60"):
        build_model("vilt_tiny", 60, 13, pretrained=str(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"head: pair answers True / False .* 13 answers"):
        build_model("vilt_tiny", 50, 13, head="pair")
    with pytest.raises(ValueError, match=r"image_size \(60\) must be a whole number of patches"):
        build_model("vilt_tiny", 50, 13, image_size=60)
    m = build_model("vilt_tiny", 50, 13)
    with pytest.raises(
        ValueError, match=r"reads 1 image\(s\) per example, the batch has 2.*head: pair"
    ):
        m(batch(images=2))
    regions = VLBatch(text_ids=torch.ones(2, 3, dtype=torch.long),
                      text_mask=torch.ones(2, 3, dtype=torch.bool), visual=torch.randn(2, 5, 16))  # fmt: skip
    with pytest.raises(ValueError, match=r"visual_features: pixels"):
        m(regions)
    with pytest.raises(ValueError, match=r"position embeddings for 32 tokens.*max_question_len"):
        m(batch(t=40))


def test_anatomy_covers_everything():
    m = build_model("vilt_tiny", 50, 13)
    an = anatomy_of(m, strict=True)
    an.validate(m)
    assert an.coverage(m).fraction == 1.0
    assert [x.name for x in an.layers] == ["vilt.encoder.layer.0", "vilt.encoder.layer.1"]
    assert {x.modality for x in an.layers} == {Modality.CROSS}
    assert an.head_modules == ["classifier"]
    with an.capture(m, ["language_input", "fused", "vilt.encoder.layer.1"]) as seen:
        m(batch())
    assert seen["language_input"].shape == (3, 7, 32) and seen["fused"].shape == (3, 32)
    assert seen["vilt.encoder.layer.1"].shape == (3, 7 + 17, 32)  # text + [CLS] + 4 x 4 patches


def test_mini_takes_minilm_text_and_layers():
    m = build_model("vilt_mini", 30522, 13)
    state = load_file(str(minilm_package_dir("") / "model.safetensors"))
    v = m.vilt
    assert torch.equal(v.embeddings.text_embeddings.word_embeddings.weight,
                       state["embeddings.word_embeddings.weight"])  # fmt: skip
    assert torch.equal(v.embeddings.text_embeddings.position_embeddings.weight,
                       state["embeddings.position_embeddings.weight"][:40])  # fmt: skip
    layer = v.encoder.layer[3]
    assert torch.equal(layer.attention.attention.key.weight, state["encoder.layer.3.attention.self.key.weight"])  # fmt: skip
    assert torch.equal(layer.layernorm_after.weight, state["encoder.layer.3.attention.output.LayerNorm.weight"])  # fmt: skip
    assert torch.equal(layer.layernorm_before.bias, state["encoder.layer.2.output.LayerNorm.bias"])
    assert torch.equal(v.encoder.layer[0].layernorm_before.weight, state["embeddings.LayerNorm.weight"])  # fmt: skip
    assert torch.equal(v.layernorm.weight, state["encoder.layer.5.output.LayerNorm.weight"])
    with pytest.raises(ValueError, match=r"vocab_size: checkpoint 30522, data 100"):
        build_model("vilt_mini", 100, 13)


def test_tiny_trains_on_real_images_and_pairs(easy_vqa_dm):
    from vlcompress.datamodules.easy_pairs import EasyPairsDataModule

    torch.manual_seed(0)
    m = build_model("vilt_tiny", len(easy_vqa_dm.word_vocab), 13)
    losses = bce_losses(m, next(iter(easy_vqa_dm.train_dataloader())))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    pairs = EasyPairsDataModule(num_train=200, num_test=20, batch_size=16)
    pairs.setup()
    p = build_model("vilt_tiny", len(pairs.word_vocab), 2, head="pair")
    losses = bce_losses(p, next(iter(pairs.train_dataloader())), steps=40)
    assert losses[0] > 0.6 and max(losses[-3:]) < 0.2, losses  # from chance to fitting the pairs


def test_sincos_positions_tell_every_patch_apart():
    from vlcompress.models.vilt import sincos_2d

    table = sincos_2d(32, 4)
    assert table.shape == (16, 32) and table.abs().max() <= 1.0
    assert torch.cdist(table, table).add(torch.eye(16)).min() > 0.1  # all distinct
    m = build_model("vilt_tiny", 50, 13, position_init="sincos")
    torch.testing.assert_close(m.vilt.embeddings.position_embeddings[0, 1:], table)
    assert build_model("vilt_tiny", 50, 13).vilt.embeddings.position_embeddings.abs().max() == 0
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 4)
