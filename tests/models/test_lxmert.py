"""LXMERT: published size and modality split, both visual inputs, anatomy, checkpoints, MiniLM."""

import json

import pytest
import torch
from fit_steps import bce_losses
from safetensors.torch import load_file

from vlcompress.data import VLBatch
from vlcompress.models import Modality, anatomy_of, build_model
from vlcompress.models.lxmert import LXMERT_VARIANTS, minilm_dir

L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS


def millions(weights):
    return sum(p.numel() for p in weights.values()) / 1e6


def region_batch(b=3, n=5, t=6, d=16, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    ids[0, 4:] = 0
    corner = torch.rand(b, n, 2, generator=g) * 0.5
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, n, d, generator=g),
        visual_mask=torch.ones(b, n, dtype=torch.bool), boxes=torch.cat([corner, corner + 0.4], -1),
    )  # fmt: skip


def test_full_size_matches_the_paper_and_the_seed_split():
    model = build_model("lxmert", vocab_size=30522, num_answers=2274)
    # ANCHORS: about 207.9M parameters without heads.
    assert sum(p.numel() for p in model.lxmert.parameters()) / 1e6 == pytest.approx(207.9, abs=0.05)
    an = anatomy_of(model, strict=True)
    assert an.coverage(model).fraction == 1.0
    w = an.prunable_weights(model)
    pooler = {n: p for n, p in w[X].items() if "pooler" in n}
    # ANCHORS (seed 000's maskable weights): language 87.14M (word embeddings 23.44M), vision
    # 36.97M, cross 82.58M, pooler 0.59M (declared with the cross weights).
    assert millions(w[L]) == pytest.approx(87.14, abs=0.01)
    assert w[L]["lxmert.embeddings.word_embeddings.weight"].numel() / 1e6 == pytest.approx(23.44, abs=0.01)  # fmt: skip
    assert millions(w[V]) == pytest.approx(36.97, abs=0.01)
    assert millions(w[X]) - millions(pooler) == pytest.approx(82.58, abs=0.01)
    assert millions(pooler) == pytest.approx(0.59, abs=0.01)
    assert list(pooler) == list(model.overall_rate_weights)


def test_region_forward_extras_and_padding_invariance():
    torch.manual_seed(0)
    m = build_model("lxmert_tiny", 50, 7).eval()
    b = region_batch()
    logits, extras = m(b, return_extras=True)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert extras["pooled"].shape == (3, m.pooled_dim) and extras["question"].shape == (3, 32)
    torch.testing.assert_close(m(b), logits)
    # Padded regions (masked) and padded question tokens must not change the logits.
    padded = VLBatch(
        text_ids=torch.cat([b.text_ids, torch.zeros(3, 3, dtype=torch.long)], 1),
        text_mask=torch.cat([b.text_mask, torch.zeros(3, 3, dtype=torch.bool)], 1),
        visual=torch.cat([b.visual, torch.randn(3, 2, 16)], 1),
        visual_mask=torch.cat([b.visual_mask, torch.zeros(3, 2, dtype=torch.bool)], 1),
        boxes=torch.cat([b.boxes, torch.rand(3, 2, 4)], 1),
    )  # fmt: skip
    torch.testing.assert_close(m(padded), logits, rtol=1e-5, atol=1e-5)
    # The boxes are read: moving them changes the answer.
    moved = VLBatch(b.text_ids, b.text_mask, b.visual, b.visual_mask, boxes=1 - b.boxes)
    assert not torch.allclose(m(moved), logits)


def test_pixels_go_through_the_adapter(easy_vqa_batch, easy_vqa_dm):
    m = build_model("lxmert_tiny", len(easy_vqa_dm.word_vocab), 13, visual_input="pixels")
    logits, extras = m(easy_vqa_batch, return_extras=True)
    assert logits.shape == (16, 13) and extras["pooled"].shape == (16, 32)
    (logits.sum() + extras["question"].sum()).backward()
    assert m.adapter.stem.convs[0].weight.grad.abs().sum() > 0
    # The same model also takes region features + boxes directly.
    assert m(region_batch(vocab=len(easy_vqa_dm.word_vocab))).shape == (3, 13)


def test_wrong_inputs_are_explained(easy_vqa_batch):
    m = build_model("lxmert_tiny", 50, 13)
    with pytest.raises(ValueError, match="visual_input: pixels"):
        m(easy_vqa_batch)
    b = region_batch()
    with pytest.raises(ValueError, match="needs region boxes"):
        m(VLBatch(b.text_ids, b.text_mask, b.visual, b.visual_mask, boxes=None))
    with pytest.raises(ValueError, match="16-d region features, the batch has 8-d"):
        m(region_batch(d=8))
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        build_model("lxmert_tiny", 50, 13, hidden_size=30)
    with pytest.raises(ValueError, match="not both"):
        build_model("lxmert_tiny", 50, 13, pretrained="/x", language_init="minilm")


def test_anatomy_split_and_coverage():
    m = build_model("lxmert_tiny", 50, 7, visual_input="pixels")
    an = anatomy_of(m, strict=True)
    assert an.coverage(m).fraction >= 0.9
    assert an.head_modules == ["task_head"]
    assert [len(an.stacks[f"lxmert.encoder.{s}"]) for s in ("layer", "r_layers", "x_layers")] == [2, 1, 1]  # fmt: skip
    w = an.prunable_weights(m)
    linear = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    lang_layers = {f"{n}.weight" for n in linear if n.startswith("lxmert.encoder.layer.")}
    assert set(w[L]) == lang_layers | {"lxmert.embeddings.word_embeddings.weight"}
    assert {"lxmert.encoder.visn_fc.visn_fc.weight", "lxmert.encoder.visn_fc.box_fc.weight",
            "adapter.stem.convs.0.weight", "adapter.stem.proj.weight"} <= set(w[V])  # fmt: skip
    assert {f"{n}.weight" for n in linear if n.startswith("lxmert.encoder.r_layers.")} <= set(w[V])
    cross = {f"{n}.weight" for n in linear if n.startswith("lxmert.encoder.x_layers.")}
    assert set(w[X]) == cross | {"lxmert.pooler.dense.weight"}
    every = [n for ws in w.values() for n in ws]
    assert len(every) == len(set(every))
    assert not [n for n in every if n.endswith("bias") or "LayerNorm" in n or "norm" in n.lower()
                or "position" in n or "token_type" in n or n.startswith("task_head")]  # fmt: skip


def _save_fixture(tmp_path, binary=False):
    """A tiny ``LxmertForPreTraining`` saved like ``unc-nlp/lxmert-base-uncased``."""
    from transformers import LxmertConfig, LxmertForPreTraining

    o = LXMERT_VARIANTS["lxmert_tiny"]
    config = LxmertConfig(
        vocab_size=50, hidden_size=o.hidden_size, num_attention_heads=o.num_heads,
        intermediate_size=o.ffn_size, l_layers=o.language_layers, r_layers=o.vision_layers,
        x_layers=o.cross_layers, visual_feat_dim=o.visual_feat_dim,
        max_position_embeddings=o.max_position_embeddings, num_qa_labels=5,
        num_object_labels=11, num_attr_labels=3,
    )  # fmt: skip
    torch.manual_seed(123)
    source = LxmertForPreTraining(config)
    if binary:  # the published file: config.json + pytorch_model.bin
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
        torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        source.save_pretrained(tmp_path)
    return source


@pytest.mark.parametrize("binary", [False, True])
def test_pretrained_checkpoint_loads(tmp_path, binary, caplog):
    source = _save_fixture(tmp_path, binary)
    files = {p.name for p in tmp_path.iterdir()}
    assert ("pytorch_model.bin" if binary else "model.safetensors") in files
    with caplog.at_level("INFO", logger="vlcompress.models.lxmert"):
        m = build_model("lxmert_tiny", 50, 7, pretrained=str(tmp_path))
    assert "ignoring the pre-training heads" in caplog.text
    theirs = source.lxmert.state_dict()
    ours = m.lxmert.state_dict()
    assert set(ours) <= set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    fresh = build_model("lxmert_tiny", 50, 7)
    assert not torch.equal(fresh.lxmert.pooler.dense.weight, m.lxmert.pooler.dense.weight)


def test_pretrained_errors_name_the_files_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected \['config.json', "
                       r"'model.safetensors or pytorch_model.bin'\].*model.options.pretrained"):  # fmt: skip
        build_model("lxmert_tiny", 50, 7, pretrained=str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks \['model.safetensors or pytorch_model"):
        build_model("lxmert_tiny", 50, 7, pretrained=str(tmp_path))
    _save_fixture(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"l_layers: checkpoint 2, model 3.*Set the model options"):
        build_model("lxmert_tiny", 50, 7, pretrained=str(tmp_path / "ckpt"), language_layers=3)
    with pytest.raises(ValueError, match=r"vocab_size: checkpoint 50, data 60.*wordpiece"):
        build_model("lxmert_tiny", 60, 7, pretrained=str(tmp_path / "ckpt"))


def test_mini_loads_the_real_minilm_language_stream():
    m = build_model("lxmert_mini", 30522, 13, vision_layers=1, cross_layers=1)
    o = m.options
    assert (o.hidden_size, o.num_heads, o.language_layers, o.ffn_size) == (384, 12, 6, 1536)
    state = load_file(str(minilm_dir() / "model.safetensors"))
    ours = m.lxmert.state_dict()
    language = [k for k in ours if k.startswith(("embeddings.", "encoder.layer."))]
    assert len(language) == 5 + 6 * 16
    for k in language:
        assert torch.equal(ours[k], state[k]), k
    # The rest is fresh (random init), not some tensor of the file.
    assert not torch.equal(ours["encoder.x_layers.0.lang_self_att.self.query.weight"],
                           state["encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    with pytest.raises(ValueError, match=r"vocab_size: checkpoint 30522, data 100"):
        build_model("lxmert_mini", 100, 13, vision_layers=1, cross_layers=1)


def test_easy_vqa_wordpiece_questions_match_the_minilm_vocab():
    from transformers import BertTokenizerFast

    from vlcompress.datamodules import EasyVQADataModule

    dm = EasyVQADataModule(split="standard", text_encoding="wordpiece", batch_size=4)
    dm.setup()
    assert dm.vocab_size() == 30522 and not hasattr(dm, "word_vocab")
    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
    batch = next(iter(dm.train_dataloader()))
    for ids, mask in zip(batch.text_ids, batch.text_mask):
        words = tok.convert_ids_to_tokens(ids[mask].tolist())
        assert words[0] == "[CLS]" and words[-1] == "[SEP]" and "[UNK]" not in words
    with pytest.raises(ValueError, match="only with text_encoding: wordpiece"):
        EasyVQADataModule(tokenizer="/x")
    with pytest.raises(FileNotFoundError, match="'/nowhere' does not exist; set it to a local"):
        EasyVQADataModule(text_encoding="wordpiece", tokenizer="/nowhere").setup()


def test_tiny_trains_on_real_batches(easy_vqa_dm):
    torch.manual_seed(0)
    m = build_model("lxmert_tiny", len(easy_vqa_dm.word_vocab), 13, visual_input="pixels")
    losses = bce_losses(m, next(iter(easy_vqa_dm.train_dataloader())))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


_X_FROM_BERT = {  # LxmertXLayer part -> the BERT-layer part it starts from (cross_init: minilm)
    "visual_attention.att": "attention.self", "visual_attention.output": "attention.output",
    "lang_self_att.self": "attention.self", "lang_self_att.output": "attention.output",
    "visn_self_att.self": "attention.self", "visn_self_att.output": "attention.output",
    "lang_inter": "intermediate", "lang_output": "output",
    "visn_inter": "intermediate", "visn_output": "output",
}  # fmt: skip


def test_mini_cross_init_loads_minilm_into_relationship_and_cross_layers(caplog):
    with caplog.at_level("INFO", logger="vlcompress.models.lxmert"):
        m = build_model("lxmert_mini", 30522, 13, visual_feat_dim=1280, cross_init="minilm")
    assert "(116 tensors)" in caplog.text  # 2 relationship layers x 16 + 2 cross layers x 42
    state = load_file(str(minilm_dir() / "model.safetensors"))
    ours = m.lxmert.state_dict()
    expected = {}
    for i in range(2):  # relationship layer i <- MiniLM layer i
        for k in [k for k in ours if k.startswith(f"encoder.r_layers.{i}.")]:
            expected[k] = k.replace(f"r_layers.{i}.", f"layer.{i}.")
    for j in range(2):  # cross layer j <- MiniLM layer 6 - 2 + j
        for k in [k for k in ours if k.startswith(f"encoder.x_layers.{j}.")]:
            part = next(p for p in _X_FROM_BERT if k.startswith(f"encoder.x_layers.{j}.{p}."))
            tail = k.removeprefix(f"encoder.x_layers.{j}.{part}.")
            expected[k] = f"encoder.layer.{4 + j}.{_X_FROM_BERT[part]}.{tail}"
    assert len(expected) == 2 * 16 + 2 * 42
    for k, theirs in expected.items():
        assert torch.equal(ours[k], state[theirs]), (k, theirs)
    assert torch.equal(ours["encoder.layer.3.output.dense.weight"],
                       state["encoder.layer.3.output.dense.weight"])  # fmt: skip
    # visn_fc and the pooler stay fresh; the model runs on regions and keeps its anatomy.
    assert not torch.equal(ours["pooler.dense.weight"], state["pooler.dense.weight"])
    logits = m.eval()(region_batch(b=2, n=16, d=1280, vocab=30522))
    assert logits.shape == (2, 13) and torch.isfinite(logits).all()
    an = anatomy_of(m, strict=True)
    assert an.coverage(m).fraction == 1.0


def test_cross_init_alone_errors_and_meta_builds(monkeypatch):
    # Without language_init (a word vocabulary): only the relationship and cross layers load.
    m = build_model("lxmert_mini", 100, 13, language_init="random", vision_layers=1,
                    cross_layers=1, cross_init="minilm")  # fmt: skip
    state = load_file(str(minilm_dir() / "model.safetensors"))
    ours = m.lxmert.state_dict()
    assert torch.equal(ours["encoder.r_layers.0.attention.self.key.weight"],
                       state["encoder.layer.0.attention.self.key.weight"])  # fmt: skip
    assert torch.equal(ours["encoder.x_layers.0.visn_output.dense.weight"],
                       state["encoder.layer.5.output.dense.weight"])  # fmt: skip
    assert not torch.equal(ours["encoder.layer.0.attention.self.key.weight"],
                           state["encoder.layer.0.attention.self.key.weight"])  # fmt: skip
    for layers in ({"vision_layers": 7}, {"cross_layers": 7}):
        with pytest.raises(ValueError, match=r"which has 6;.*Set both to at most 6, or "
                           r"cross_init: random"):  # fmt: skip
            build_model("lxmert_mini", 30522, 13, cross_init="minilm", **layers)
    with pytest.raises(ValueError, match=r"cross_init='minilm', not both; set cross_init: random"):
        build_model("lxmert_tiny", 50, 13, pretrained="/x", cross_init="minilm")
    with pytest.raises(ValueError, match=r"hidden_size: checkpoint 384, model 32"):
        build_model("lxmert_tiny", 50, 13, cross_init="minilm")

    def no_reading(*args, **kwargs):
        raise AssertionError("a meta build read the MiniLM weights")

    monkeypatch.setattr("vlcompress.models.lxmert.read_bert_checkpoint", no_reading)
    with torch.device("meta"):  # the preflight's structure-only model reads no files
        meta = build_model("lxmert_mini", 30522, 13, cross_init="minilm")
    assert meta.lxmert.encoder.x_layers[0].lang_inter.dense.weight.is_meta
