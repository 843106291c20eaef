"""UNITER: forward and extras, both visual inputs, anatomy, the published checkpoint, MiniLM."""

import pytest
import torch
from fit_steps import bce_losses
from safetensors.torch import load_file

from vlcompress.data import VLBatch
from vlcompress.models import Modality, anatomy_of, build_model
from vlcompress.models.uniter import UNITER_VARIANTS, box_features
from vlcompress.utils.assets import minilm_package_dir

L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS
TINY = UNITER_VARIANTS["uniter_tiny"]


def region_batch(b=3, n=5, t=6, d=16, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    ids[0, 4:] = 0
    corner = torch.rand(b, n, 2, generator=g) * 0.5
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, n, d, generator=g),
        visual_mask=torch.ones(b, n, dtype=torch.bool), boxes=torch.cat([corner, corner + 0.4], -1),
    )  # fmt: skip


def test_box_features_are_uniters_seven():
    boxes = torch.tensor([[0.0, 0.5, 0.5, 1.0], [0.1, 0.2, 0.4, 0.3]])
    expected = torch.tensor(
        [[0.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.25], [0.1, 0.2, 0.4, 0.3, 0.3, 0.1, 0.03]]
    )
    torch.testing.assert_close(box_features(boxes), expected)


def test_region_forward_extras_and_padding_invariance():
    torch.manual_seed(0)
    m = build_model("uniter_tiny", 50, 7).eval()
    b = region_batch()
    logits, extras = m(b, return_extras=True)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert extras["pooled"].shape == (3, m.pooled_dim) == (3, 32)
    assert extras["question"].shape == (3, m.question_dim)
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
    # The question vector reads the question only; the boxes are read by the stream.
    moved = VLBatch(b.text_ids, b.text_mask, b.visual, b.visual_mask, boxes=1 - b.boxes)
    moved_logits, moved_extras = m(moved, return_extras=True)
    assert not torch.allclose(moved_logits, logits)
    torch.testing.assert_close(moved_extras["question"], extras["question"])


def test_pixels_go_through_the_adapter(easy_vqa_batch, easy_vqa_dm):
    m = build_model("uniter_tiny", len(easy_vqa_dm.word_vocab), 13, visual_input="pixels")
    logits, extras = m(easy_vqa_batch, return_extras=True)
    assert logits.shape == (16, 13) and extras["pooled"].shape == (16, 32)
    logits.sum().backward()
    assert m.adapter.stem.convs[0].weight.grad.abs().sum() > 0
    # The same model also takes region features + boxes directly.
    assert m(region_batch(vocab=len(easy_vqa_dm.word_vocab))).shape == (3, 13)


def test_wrong_inputs_and_options_are_explained(easy_vqa_batch):
    m = build_model("uniter_tiny", 50, 13)
    with pytest.raises(ValueError, match="visual_input: pixels"):
        m(easy_vqa_batch)
    b = region_batch()
    no_boxes = VLBatch(b.text_ids, b.text_mask, b.visual, b.visual_mask, boxes=None)
    with pytest.raises(ValueError, match="needs region boxes.*missing_boxes: zeros"):
        m(no_boxes)
    zeros = build_model("uniter_tiny", 50, 13, missing_boxes="zeros").eval()
    assert zeros(no_boxes).shape == (3, 13)
    with pytest.raises(ValueError, match="16-d region features, the batch has 8-d"):
        m(region_batch(d=8))
    with pytest.raises(ValueError, match="position embeddings for 32 tokens.*of 40"):
        m(region_batch(t=40))
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        build_model("uniter_tiny", 50, 13, hidden_size=30)
    with pytest.raises(ValueError, match="not both"):
        build_model("uniter_tiny", 50, 13, pretrained="/x", language_init="minilm")
    with pytest.raises(ValueError, match="missing_boxes: 'none' is not one of"):
        build_model("uniter_tiny", 50, 13, missing_boxes="none")


def test_anatomy_validates_covers_everything_and_splits_the_modalities():
    m = build_model("uniter_tiny", 50, 7, visual_input="pixels")
    an = anatomy_of(m, strict=True)
    an.validate(m)
    assert an.coverage(m).fraction == 1.0
    assert an.stacks == {"uniter.encoder.layer": ["uniter.encoder.layer.0", "uniter.encoder.layer.1"]}  # fmt: skip
    assert {x.modality for x in an.layers} == {X}
    assert [(a.kind, a.num_heads, a.head_dim, a.query_side, a.key_side) for a in an.attentions] == [("self", 4, 8, X, X)] * 2  # fmt: skip
    assert [f.inner_dim for f in an.ffns] == [64, 64]
    assert an.head_modules == ["task_head"]
    w = an.prunable_weights(m)
    assert set(w[L]) == {"uniter.embeddings.word_embeddings.weight"}
    assert {"uniter.img_embeddings.img_linear.weight", "uniter.img_embeddings.pos_linear.weight",
            "adapter.stem.convs.0.weight", "adapter.stem.proj.weight"} <= set(w[V])  # fmt: skip
    assert "uniter.img_embeddings.mask_embedding.weight" not in w[V]  # unused: no mask on it
    linear = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    layers = {f"{n}.weight" for n in linear if n.startswith("uniter.encoder.layer.")}
    assert set(w[X]) == layers | {"uniter.pooler.dense.weight"}
    # Read-outs: one per layer and the inputs of each modality.
    batch = region_batch()
    with an.capture(m, ["language_input", "vision_input", "uniter.encoder.layer.1"]) as seen:
        m(batch)
    assert seen["language_input"].shape == (3, 6, 32) and seen["vision_input"].shape == (3, 5, 32)
    assert seen["uniter.encoder.layer.1"].shape == (3, 11, 32)


def test_base_is_bert_base_cased_plus_image_embeddings():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        m = build_model("uniter_base", 28996, 3129)
        bert = BertModel(BertConfig(vocab_size=28996))  # bert-base-cased's sizes
    body = {k: v.shape for k, v in m.uniter.state_dict().items()}
    image = {k: s for k, s in body.items() if k.startswith("img_embeddings.")}
    assert {k: s for k, s in body.items() if k not in image} == {
        k: v.shape for k, v in bert.state_dict().items()
    }
    assert image["img_embeddings.img_linear.weight"] == (768, 2048)
    assert image["img_embeddings.pos_linear.weight"] == (768, 7)
    assert image["img_embeddings.mask_embedding.weight"] == (2, 2048)
    assert [p.shape for p in m.task_head.parameters()] == [
        (1536, 768), (1536,), (1536,), (1536,), (3129, 1536), (3129,)
    ]  # fmt: skip


# ---------------------------------------------------------------------- the published file
def published_state(layers=2, hidden=32, ffn=64, vocab=50, positions=32, region=16, answers=5,
                    vqa=True, old_names=True):  # fmt: skip
    """Random tensors under the key names of ChenRocks/UNITER's ``uniter-base.pt`` (plus
    ``vqa_output`` of a fine-tuned VQA checkpoint); BERT's LayerNorms as ``gamma``/``beta``."""
    g = torch.Generator().manual_seed(7)
    state = {}

    def put(key, *shape):
        state[key] = torch.randn(*shape, generator=g)

    def norm(key, size, old=old_names):
        put(f"{key}.{'gamma' if old else 'weight'}", size)
        put(f"{key}.{'beta' if old else 'bias'}", size)

    def linear(key, n_in, n_out):
        put(f"{key}.weight", n_out, n_in)
        put(f"{key}.bias", n_out)

    put("uniter.embeddings.word_embeddings.weight", vocab, hidden)
    put("uniter.embeddings.position_embeddings.weight", positions, hidden)
    put("uniter.embeddings.token_type_embeddings.weight", 2, hidden)
    norm("uniter.embeddings.LayerNorm", hidden)
    i = "uniter.img_embeddings"
    linear(f"{i}.img_linear", region, hidden)
    norm(f"{i}.img_layer_norm", hidden, old=False)
    linear(f"{i}.pos_linear", 7, hidden)
    norm(f"{i}.pos_layer_norm", hidden, old=False)
    put(f"{i}.mask_embedding.weight", 2, region)
    norm(f"{i}.LayerNorm", hidden, old=False)
    for n in range(layers):
        p = f"uniter.encoder.layer.{n}"
        for proj in ("query", "key", "value"):
            linear(f"{p}.attention.self.{proj}", hidden, hidden)
        linear(f"{p}.attention.output.dense", hidden, hidden)
        norm(f"{p}.attention.output.LayerNorm", hidden)
        linear(f"{p}.intermediate.dense", hidden, ffn)
        linear(f"{p}.output.dense", ffn, hidden)
        norm(f"{p}.output.LayerNorm", hidden)
    linear("uniter.pooler.dense", hidden, hidden)
    # Pre-training heads (ignored by the VQA model).
    put("cls.predictions.bias", vocab)
    linear("cls.predictions.transform.dense", hidden, hidden)
    linear("feat_regress.net.0", hidden, hidden)
    linear("region_classifier.net.0", hidden, hidden)
    linear("itm_output", hidden, 2)
    if vqa:
        linear("vqa_output.0", hidden, 2 * hidden)
        norm("vqa_output.2", 2 * hidden, old=False)
        linear("vqa_output.3", 2 * hidden, answers)
    return state


def ours(key):
    """Our name of a published key."""
    key = key.replace("vqa_output.", "task_head.")
    return key.removesuffix(".gamma") + ".weight" if key.endswith(".gamma") else (
        key.removesuffix(".beta") + ".bias" if key.endswith(".beta") else key
    )  # fmt: skip


@pytest.mark.parametrize("vqa", [True, False])
def test_published_checkpoint_loads(tmp_path, vqa, caplog):
    state = published_state(vqa=vqa)
    assert any(k.endswith(".gamma") for k in state) and any(k.endswith(".beta") for k in state)
    torch.save(state, tmp_path / "uniter-base.pt")
    with caplog.at_level("INFO", logger="vlcompress.models.uniter"):
        m = build_model("uniter_tiny", 50, 5, pretrained=str(tmp_path / "uniter-base.pt"))
    assert "ignoring the pre-training heads ['cls', 'feat_regress', 'itm_output', 'region_classifier']" in caplog.text  # fmt: skip
    loaded = m.state_dict()
    body = [k for k in state if k.startswith("uniter.") or vqa and k.startswith("vqa_output.")]
    for k in body:
        assert torch.equal(loaded[ours(k)], state[k]), k
    assert len(body) == len(loaded) - (0 if vqa else 6)
    if not vqa:  # the task head stays fresh (not some tensor of the file)
        fresh = build_model("uniter_tiny", 50, 5)
        assert {n for n in loaded if n.startswith("task_head")} == {
            n for n, _ in fresh.named_parameters() if n.startswith("task_head")
        }
        assert not torch.equal(loaded["task_head.0.weight"], state["uniter.pooler.dense.weight"])
    # The loaded model runs.
    assert m.eval()(region_batch()).shape == (3, 5)


def test_published_checkpoint_errors_name_the_key_and_the_fix(tmp_path):
    path = tmp_path / "uniter-base.pt"
    with pytest.raises(FileNotFoundError, match="does not exist.*download_pretrained.sh"):
        build_model("uniter_tiny", 50, 5, pretrained=str(path))
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"not a UNITER checkpoint.*found \['state_dict'\]"):
        build_model("uniter_tiny", 50, 5, pretrained=str(path))

    def fails_with(match, state, **options):
        torch.save(state, path)
        with pytest.raises(ValueError, match=match):
            build_model("uniter_tiny", options.pop("vocab", 50), 5, pretrained=str(path), **options)

    state = published_state()
    del state["uniter.img_embeddings.mask_embedding.weight"]
    fails_with(r"missing \['uniter.img_embeddings.mask_embedding.weight'\]; unexpected nothing",
               state)  # fmt: skip
    state = published_state()
    state["uniter.pooler.extra.weight"] = torch.zeros(1)
    fails_with(r"missing nothing; unexpected \['uniter.pooler.extra.weight'\]", state)
    fails_with("has 3 encoder layers, the model 2; set model.options.num_layers: 3",
               published_state(layers=3))  # fmt: skip
    fails_with(r"img_embeddings.img_linear.weight: checkpoint \(32, 2048\), model \(32, 16\) "
               r"\(set model.options.region_dim\)", published_state(region=2048))  # fmt: skip
    fails_with(r"word_embeddings.weight: checkpoint \(28996, 32\), model \(50, 32\) \(use the "
               r"checkpoint's vocabulary: .*28,996", published_state(vocab=28996))  # fmt: skip
    fails_with(r"task_head.3.weight: checkpoint \(3129, 64\), model \(5, 64\) \(use the "
               r"checkpoint's answer vocabulary", published_state(answers=3129))  # fmt: skip
    fails_with(r"intermediate.dense.weight: checkpoint \(128, 32\), model \(64, 32\) \(set "
               r"model.options.ffn_size\)", published_state(ffn=128))  # fmt: skip
    state = published_state()
    state["uniter.embeddings.token_type_embeddings.weight"] = torch.zeros(4, 32)  # VCR's
    fails_with(r"token_type_embeddings.weight: checkpoint \(4, 32\), model \(2, 32\) \(use a "
               r"checkpoint of the VQA layout", state)  # fmt: skip
    fails_with(r"embeddings.word_embeddings.weight: .*\(set model.options.hidden_size\).*more",
               published_state(hidden=48))  # fmt: skip


# ---------------------------------------------------------------------- MiniLM
def test_mini_loads_the_real_minilm_weights():
    m = build_model("uniter_mini", 30522, 13)
    o = m.options
    assert (o.hidden_size, o.num_heads, o.num_layers, o.ffn_size) == (384, 12, 6, 1536)
    state = load_file(str(minilm_package_dir("") / "model.safetensors"))
    body = m.uniter.state_dict()
    bert = [k for k in body if k.startswith(("embeddings.", "encoder.layer."))]
    assert len(bert) == 5 + 6 * 16
    for k in bert:
        assert torch.equal(body[k], state[k]), k
    # The rest is fresh (random init), not some tensor of the file.
    assert not torch.equal(body["pooler.dense.weight"], state["pooler.dense.weight"])
    with pytest.raises(ValueError, match=r"vocab_size: checkpoint 30522, data 100"):
        build_model("uniter_mini", 100, 13)
    with pytest.raises(ValueError, match=r"num_hidden_layers: checkpoint 6, model 2"):
        build_model("uniter_mini", 30522, 13, num_layers=2)


def test_tiny_trains_on_real_batches(easy_vqa_dm):
    torch.manual_seed(0)
    m = build_model("uniter_tiny", len(easy_vqa_dm.word_vocab), 13, visual_input="pixels")
    losses = bce_losses(m, next(iter(easy_vqa_dm.train_dataloader())))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
