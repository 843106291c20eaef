"""A whole model on the Triton attention vs torch SDPA (TRITON_INTERPRET=1 on the CPU): MCAN's
logits and every parameter's gradient agree, with padded questions and regions, dead heads
and a slimmed width; in training mode the kernel's dropout is reproducible."""

import os

import pytest
import torch

from vlcompress.data import VLBatch
from vlcompress.kernels import attention_backend
from vlcompress.models import build_model

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mcan():
    torch.manual_seed(0)
    opts = dict(hidden_size=64, num_heads=4, ffn_size=128, num_layers=2, width_adapters=True)
    return build_model("mcan_tiny", 30, 7, **opts).to(DEVICE)


def batch(b=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (b, 9), generator=g)
    ids[0, 5:] = 0  # padded questions
    mask = torch.ones(b, 11, dtype=torch.bool)
    mask[1, 4:] = False  # padded regions
    feats = torch.randn(b, 11, 16, generator=g)
    return VLBatch(text_ids=ids.to(DEVICE), text_mask=(ids != 0).to(DEVICE),
                   visual=feats.to(DEVICE), visual_mask=mask.to(DEVICE))  # fmt: skip


def run(model, b, backend):
    model.zero_grad()
    with attention_backend(backend):
        logits = model(b)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}  # fmt: skip


def assert_same(got, want, got_g, want_g):
    """The same logits and the same gradient of every parameter."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-5, msg=n)


def test_mcan_logits_and_gradients_match_across_backends():
    from vlcompress.compress.slimmable import Slimmable, Submodel
    from vlcompress.models.anatomy import anatomy_of

    model, b = mcan().eval(), batch()
    an = anatomy_of(model)
    first = an.attentions[0].name
    handles = an.mask_heads(model, {first: torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEVICE)})
    want, want_g = run(model, b, "sdpa")
    got, got_g = run(model, b, "triton")
    assert_same(got, want, got_g, want_g)
    for h in handles:
        h.remove()
    slim = Slimmable(model)  # half width: the kernel sees 2 live heads
    with slim.submodel(Submodel(0.5, 1.0)):
        want, _ = run(model, b, "sdpa")
        got, _ = run(model, b, "triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_mode_dropout_in_the_kernel_is_reproducible():
    model, b = mcan().train(), batch()
    torch.manual_seed(11)
    a, ga = run(model, b, "triton")
    torch.manual_seed(11)
    again, g_again = run(model, b, "triton")
    torch.manual_seed(12)
    other, _ = run(model, b, "triton")
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert all(torch.equal(ga[n], g_again[n]) for n in ga)
    model.eval()
    with torch.no_grad(), attention_backend("triton"):
        clean = model(b)
    assert not torch.allclose(a, clean)  # dropout (attention and elsewhere) was on


@pytest.mark.parametrize("packing", ["attention", "stack"])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_mcan_packing_gives_the_padded_logits_and_gradients(backend, packing):
    """``packing``: the real tokens packed around every attention call (varlen), or the whole
    layer stack run on them; padded positions never reach the answer, so logits and gradients
    are unchanged (with a dead head and a slimmed width too)."""
    from vlcompress.compress.slimmable import Slimmable, Submodel
    from vlcompress.models.anatomy import anatomy_of

    b = batch()
    b.text_ids[2, 1:] = 0  # a one-token question
    b.text_mask[2, 1:] = False
    torch.manual_seed(0)
    opts = dict(hidden_size=64, num_heads=4, ffn_size=128, num_layers=2, width_adapters=True)
    padded = build_model("mcan_tiny", 30, 7, **opts).to(DEVICE).eval()
    packed = build_model("mcan_tiny", 30, 7, packing=packing, **opts).to(DEVICE).eval()
    packed.load_state_dict(padded.state_dict())
    handles = []
    for model in (padded, packed):
        an = anatomy_of(model)
        handles += an.mask_heads(model, {an.attentions[0].name: torch.tensor([1.0, 0, 1, 1])})
        dead = torch.ones(3, 4, device=DEVICE)  # per (batch, head), set on the module
        dead[1, 3] = dead[0, 1] = 0.0
        model.get_submodule(an.attentions[-1].name).head_mask = dead
    want, want_g = run(padded, b, backend)
    got, got_g = run(packed, b, backend)
    assert_same(got, want, got_g, want_g)
    for h in handles:
        h.remove()
    for model in (padded, packed):
        model.get_submodule(an.attentions[-1].name).head_mask = None
    with Slimmable(padded).submodel(Submodel(0.5, 0.5)):
        want, _ = run(padded, b, backend)
    with Slimmable(packed).submodel(Submodel(0.5, 0.5)):
        got, _ = run(packed, b, backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_mcan_packed_stack_reads_the_device_once_per_stream(backend):
    """On a GPU every read of the device stalls the host: the packed stack finds each
    stream's real tokens once (2 reads) for all 4 x 3 attention calls, forward and backward;
    the padded model reads it never."""
    from vlcompress.kernels.host_syncs import HostSyncCounter

    b = batch()
    for packing, reads in (("padded", 0), ("attention", 2), ("stack", 2)):
        model = build_model("mcan_tiny", 30, 7, packing=packing, hidden_size=64).to(DEVICE)
        with HostSyncCounter() as count, attention_backend(backend):
            model.train()(b).square().sum().backward()
        assert count.syncs == reads, (packing, dict(count.sync_ops))


def uniter_batch(b=3):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 30, (b, 7), generator=g)
    ids[0, 4:] = 0
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[2, 3:] = False
    return VLBatch(text_ids=ids.to(DEVICE), text_mask=(ids != 0).to(DEVICE),
                   visual=torch.randn(b, 5, 16, generator=g).to(DEVICE), visual_mask=mask.to(DEVICE),
                   boxes=torch.rand(b, 5, 4, generator=g).sort(-1).values.to(DEVICE))  # fmt: skip


def test_hf_bert_stream_runs_on_our_attention_with_the_same_logits_and_gradients():
    """UNITER's BERT stream uses ``attn_implementation="vlcompress"``: its attention reaches
    our dispatcher (the kernel under ``triton``) and matches transformers' own SDPA path."""
    from vlcompress.kernels import hf

    torch.manual_seed(0)
    model = build_model("uniter_tiny", 30, 7, hidden_size=64).to(DEVICE).eval()
    layer = model.body.encoder.layer[0]
    assert layer.attention.self.config._attn_implementation == hf.NAME
    calls = []
    original = hf.attention
    try:  # count the calls that reach the dispatcher
        hf.attention = lambda *a, **k: calls.append(1) or original(*a, **k)
        b = uniter_batch()
        got, got_g = run(model, b, "triton")
    finally:
        hf.attention = original
    assert len(calls) == len(model.body.encoder.layer)
    for lyr in model.body.encoder.layer:
        lyr.attention.self.config._attn_implementation = "sdpa"
    want, want_g = run(model, b, "sdpa")
    assert_same(got, want, got_g, want_g)


def test_hf_attention_takes_only_what_the_kernel_can_express():
    from vlcompress.kernels.hf import key_padding_mask

    m = torch.rand(2, 6) > 0.3
    assert torch.equal(key_padding_mask(m[:, None, None, :], 2, 6), m)
    assert torch.equal(key_padding_mask(m[:, None, None, :].expand(2, 1, 4, 6), 2, 6), m)
    assert key_padding_mask(None, 2, 6) is None
    per_query = torch.rand(2, 1, 4, 6) > 0.3  # a mask that differs per query
    assert key_padding_mask(per_query, 2, 6) is False
    assert key_padding_mask(m[:, None, None, :].float(), 2, 6) is False  # additive masks


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_uniter_packed_stack_gives_the_padded_logits_and_gradients(backend):
    """``packing: stack``: the real text and image tokens of the batch run through every BERT
    layer as one packed row (varlen attention); same logits and gradients as padded."""
    b = uniter_batch()
    torch.manual_seed(0)
    padded = build_model("uniter_tiny", 30, 7, hidden_size=64).to(DEVICE).eval()
    packed = build_model("uniter_tiny", 30, 7, hidden_size=64, packing="stack").to(DEVICE)
    packed.load_state_dict(padded.state_dict())
    packed.eval()
    seen = []
    hook = packed.body.encoder.layer[0].register_forward_hook(lambda m, a, o: seen.append(o))
    want, want_g = run(padded, b, backend)
    got, got_g = run(packed, b, backend)
    hook.remove()
    real = int(b.text_mask.sum() + b.visual_mask.sum())
    assert seen[0].shape == (1, real, 64)  # no padded token computed
    from vlcompress.kernels.host_syncs import HostSyncCounter

    with HostSyncCounter() as count:
        packed(b)
    assert count.syncs == 1  # the real tokens, found once
    assert_same(got, want, got_g, want_g)


def test_stack_packing_refuses_an_attention_that_cannot_read_lengths():
    model = build_model("uniter_tiny", 30, 7, hidden_size=64, packing="stack")
    for lyr in model.body.encoder.layer:
        lyr.attention.self.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="packing: stack needs"):
        model.eval()(uniter_batch())
    with pytest.raises(ValueError, match="packing: 'ragged' is not one of"):
        build_model("uniter_tiny", 30, 7, packing="ragged")


@pytest.mark.parametrize("packing", ["padded", "stack"])
def test_soft_and_trainable_head_gates_behave_as_on_sdpa(packing):
    """Head gates are floats: a soft gate scales its head, and a gate that requires a gradient
    (first-order importance in StructuredPruning) gets the same gradient from the Triton path
    as from SDPA, a gate at 0 included."""
    from vlcompress.models.anatomy import anatomy_of

    b = batch()
    torch.manual_seed(0)
    opts = dict(hidden_size=64, num_heads=4, ffn_size=128, num_layers=2)
    model = build_model("mcan_tiny", 30, 7, packing=packing, **opts).to(DEVICE).eval()
    an = anatomy_of(model)
    grads, logits = {}, {}
    for backend in ("sdpa", "triton"):
        gates = {a.name: torch.tensor([1.0, 0.5, 0.0, 1.0], device=DEVICE, requires_grad=True)
                 for a in an.attentions}  # fmt: skip
        handles = an.mask_heads(model, gates)
        with attention_backend(backend):
            out = model(b)
        out.square().sum().backward()
        for h in handles:
            h.remove()
        logits[backend] = out.detach()
        grads[backend] = {n: g.grad for n, g in gates.items()}
    torch.testing.assert_close(logits["triton"], logits["sdpa"], rtol=1e-4, atol=1e-5)
    for n, g in grads["sdpa"].items():
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(grads["triton"][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_a_whole_hf_bert_model_keeps_its_padding_on_our_attention():
    """A transformers model that builds its own masks (``BertModel`` from a 2-D attention
    mask) gets key padding through our mask hook, so every call reaches our dispatcher and the
    real tokens' outputs equal transformers' SDPA."""
    from transformers import BertConfig, BertModel

    from vlcompress.kernels import hf

    sizes = dict(vocab_size=40, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                 num_hidden_layers=2, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    ours = BertModel(BertConfig(**sizes, attn_implementation=hf.NAME)).to(DEVICE).eval()
    theirs = BertModel(BertConfig(**sizes, attn_implementation="sdpa")).to(DEVICE).eval()
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(1, 40, (3, 9), device=DEVICE)
    mask = torch.ones(3, 9, dtype=torch.long, device=DEVICE)
    mask[0, 5:] = mask[2, 2:] = 0
    seen = []
    original = hf.attention
    try:
        hf.attention = lambda *a, **k: seen.append(k["key_padding_mask"]) or original(*a, **k)
        with attention_backend("triton"):
            got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        hf.attention = original
    want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(seen) == 2 and all(torch.equal(m, mask.bool()) for m in seen)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
