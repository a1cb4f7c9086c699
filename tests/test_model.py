"""The per-segment model: causality (no leakage through tokens, memory or cache), the mask layout,
memory carrying information, reference equalities and activation checkpointing.

Tiny float64 models on CPU (d_model 32, 2 layers), so "unchanged" can be checked to 1e-12."""

from __future__ import annotations

import pytest
import torch

from rmt_dist.config import Config
from rmt_dist.model import IGNORE_INDEX, MemoryModel, MemoryState, build_model, forward_segments
from rmt_dist.model.backbone import BlockCausal
from rmt_dist.model.memory import segment_mask

KINDS = ("none", "memtr", "xl", "rmt", "rmt_xl", "infinite")
RECURRENT = ("xl", "rmt", "rmt_xl", "infinite")
VOCAB, B, L, S = 23, 2, 5, 3  # vocab, batch, segment length, segments
TIGHT = dict(rtol=0.0, atol=1e-12)


def tiny(kind: str, m: int = 3, xl_len: int = 7, dropout: float = 0.0, ac: bool = False, seed: int = 0,
         recompute: str = "all") -> MemoryModel:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = 32, 2, 4, 64
    cfg.model.dropout = dropout
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.xl_len = kind, m, xl_len
    cfg.train.activation_checkpointing, cfg.train.recompute = ac, recompute
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB).double()


def segments_of(ids: torch.Tensor, labels: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    labels = ids.roll(-1, dims=1) if labels is None else labels
    return [(ids[:, i:i + L], labels[:, i:i + L]) for i in range(0, ids.shape[1], L)]


def all_logits(model: MemoryModel, ids: torch.Tensor) -> torch.Tensor:
    """[B, S * L, V]: logits of every position, memory and cache carried across segments."""
    outputs, _ = forward_segments(model, segments_of(ids))
    return torch.cat([o.logits for o in outputs], dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_changing_a_token_never_changes_earlier_logits(kind: str) -> None:
    model = tiny(kind).eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    base = all_logits(model, ids)
    # Token t in segment 1 and 2 (0-based), at a segment's first position, middle and last.
    for t in (L, L + 2, L + L - 1, 2 * L, 2 * L + 3):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(B)) % VOCAB
        out = all_logits(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], **TIGHT, msg=f"{kind}: token {t} leaked backwards")
        assert not torch.allclose(out[:, t], base[:, t]), f"{kind}: logits at {t} ignore token {t}"


@pytest.mark.parametrize("kind", KINDS)
def test_memory_carries_information_only_for_recurrent_kinds(kind: str) -> None:
    model = tiny(kind).eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    changed = ids.clone()
    changed[:, L - 1] = (changed[:, L - 1] + 1) % VOCAB  # last token of segment 0 (inside the XL cache)
    before, after = all_logits(model, ids), all_logits(model, changed)
    seg1 = slice(L, 2 * L)
    if kind in RECURRENT:
        assert (after[:, seg1] - before[:, seg1]).abs().max() > 1e-6, f"{kind}: segment 1 ignores segment 0"
    else:
        torch.testing.assert_close(after[:, seg1], before[:, seg1], **TIGHT)


def test_rmt_memory_reaches_two_segments_back() -> None:
    """Only through memory (no cache): segment 2 depends on segment 0 via two write/read hops."""
    model = tiny("rmt").eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    diff = (all_logits(model, changed) - all_logits(model, ids))[:, 2 * L:]
    assert diff.abs().max() > 1e-6


@pytest.mark.parametrize("kind,read,write", [("memtr", 3, 0), ("rmt", 3, 3), ("rmt_xl", 3, 3), ("xl", 0, 0)])
def test_segment_mask_rows(kind: str, read: int, write: int) -> None:
    c = 4 if kind in ("xl", "rmt_xl") else 0
    mask = segment_mask(kind, 3 if read else 0, L, c)
    T = read + L + write
    assert mask.shape == (T, c + T) and mask.dtype == torch.bool
    expected = torch.zeros(T, c + T, dtype=torch.bool)
    expected[:, :c] = True  # the cache holds only earlier segments
    expected[:read, c:c + read] = True  # read block: all of its own block, nothing else
    expected[read:read + L, c:c + read] = True  # tokens see all read memory ...
    expected[read:read + L, c + read:c + read + L] = torch.ones(L, L, dtype=torch.bool).tril()  # ... causally
    expected[read + L:, :] = True  # write block sees everything
    assert torch.equal(mask, expected)
    assert torch.equal(BlockCausal(read, write, c).dense(T), expected)  # what the model passes, by structure
    if read:
        assert mask[:read, c:c + read].all(), "read memory must attend to its whole block, not causally"
        assert not mask[:read, c + read:].any(), "read memory must not see the segment's tokens"


def test_no_mask_without_memory_or_cache() -> None:
    assert segment_mask("none", 0, L, 0) is None
    assert segment_mask("memtr", 0, L, 0) is None
    assert segment_mask("xl", 0, L, 0) is None


@pytest.mark.parametrize("kind", ("memtr", "rmt", "rmt_xl"))
def test_read_memory_attends_to_its_whole_block(kind: str) -> None:
    """The first read position's output depends on the last memory token (a causal read block would
    cut that) and on no segment token."""
    model = tiny(kind).eval()
    captured = {}
    model.backbone.register_forward_hook(lambda mod, args, out: captured.__setitem__("h", out[0]))
    ids = torch.randint(0, VOCAB, (B, L))
    if kind == "memtr":
        memory = model.memory_init.weight
        state = MemoryState()
    else:
        memory = torch.randn(B, 3, 32, dtype=torch.float64, requires_grad=True)
        state = MemoryState(memory=memory)
    x_tokens = []
    handle = model.backbone.embed.register_forward_hook(lambda mod, args, out: x_tokens.append(out))
    model(ids, None, state)
    handle.remove()
    # (a random projection: the plain sum of a LayerNorm output is constant)
    h_read0 = (captured["h"][:, 0] * torch.randn(32, dtype=torch.float64)).sum()
    g_mem, g_tok = torch.autograd.grad(h_read0, [memory, x_tokens[0]])
    assert g_mem[..., -1, :].abs().max() > 0, "read position 0 does not see the last memory token"
    assert g_tok.abs().max() == 0, "read memory sees the segment's tokens"


def test_none_over_one_segment_equals_the_plain_backbone() -> None:
    model = tiny("none").eval()
    ids = torch.randint(0, VOCAB, (B, 2 * L))
    labels = ids.roll(-1, dims=1)
    out = model(ids, labels, model.init_state())
    bb = model.backbone
    causal = torch.ones(2 * L, 2 * L, dtype=torch.bool).tril()
    reference = bb.logits(bb(bb.embed(ids), mask=causal)[0])
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-12)
    loss = torch.nn.functional.cross_entropy(reference.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, loss)
    assert out.state.memory is None and out.state.xl is None


def test_xl_with_a_cache_of_everything_equals_the_backbone_over_the_whole_sequence() -> None:
    """A cache that holds every earlier token's layer inputs makes XL exactly a causal transformer over
    the concatenated segments: this checks cache contents, positions (rotary over [cache ; x]) and mask."""
    model = tiny("xl", xl_len=(S - 1) * L).eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    bb = model.backbone
    reference = bb.logits(bb(bb.embed(ids))[0])
    torch.testing.assert_close(all_logits(model, ids), reference, rtol=0, atol=1e-10)
    short = tiny("xl", xl_len=L - 1).eval()  # a shorter cache really forgets
    short.load_state_dict(model.state_dict())
    assert not torch.allclose(all_logits(short, ids)[:, L:], reference[:, L:])


def test_rmt_step_equals_the_papers_layout_built_by_hand() -> None:
    """[read ; tokens ; write] with read = write = incoming memory, H_write the next memory; gradients
    reach the incoming memory through both copies."""
    m = 3
    model = tiny("rmt", m=m).eval()
    ids = torch.randint(0, VOCAB, (B, L))
    labels = ids.roll(-1, dims=1)
    memory = torch.randn(B, m, 32, dtype=torch.float64, requires_grad=True)
    out = model(ids, labels, MemoryState(memory=memory))
    probe = torch.randn(B, m, 32, dtype=torch.float64)
    (g,) = torch.autograd.grad(out.loss_sum + (out.state.memory * probe).sum(), memory)

    bb = model.backbone
    mask = torch.zeros(m + L + m, m + L + m, dtype=torch.bool)
    mask[:, :m] = True
    mask[m:m + L, m:m + L] = torch.ones(L, L, dtype=torch.bool).tril()
    mask[m + L:] = True
    h, _ = bb(torch.cat([memory, bb.embed(ids), memory], dim=1), mask=mask)
    logits = bb.logits(h[:, m:m + L])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    (g_ref,) = torch.autograd.grad(loss + (h[:, m + L:] * probe).sum(), memory)
    torch.testing.assert_close(out.logits, logits, **TIGHT)
    torch.testing.assert_close(out.state.memory, h[:, m + L:], **TIGHT)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # The first segment starts from the learned initial memory.
    first = model(ids, labels, model.init_state())
    again = model(ids, labels, MemoryState(memory=model.memory_init.weight.expand(B, -1, -1)))
    torch.testing.assert_close(first.logits, again.logits, **TIGHT)


def test_memtr_with_no_memory_tokens_equals_none() -> None:
    none, memtr = tiny("none"), tiny("memtr", m=0)
    memtr.load_state_dict(none.state_dict())
    ids = torch.randint(0, VOCAB, (B, S * L))
    a, _ = forward_segments(none.eval(), segments_of(ids))
    b, _ = forward_segments(memtr.eval(), segments_of(ids))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.logits, y.logits, **TIGHT)
        torch.testing.assert_close(x.loss_sum, y.loss_sum, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_caller_labels_and_ids_are_never_modified(kind: str) -> None:
    from rmt_dist.model import StreamState, evaluate_segments, stream_train_step, train_segments

    model = tiny(kind)
    ids = torch.randint(0, VOCAB, (B, S * L))
    labels = ids.roll(-1, dims=1)
    labels[:, :2] = IGNORE_INDEX
    ids0, labels0 = ids.clone(), labels.clone()
    segs = segments_of(ids, labels)
    forward_segments(model, segs)
    evaluate_segments(model, segs)
    train_segments(model, segs, bptt_unroll=1, bptt_mode="sliding")
    train_segments(model, segs, bptt_unroll=-1, replay=kind != "none")
    _, stream = stream_train_step(model, StreamState(), segs, bptt_unroll=1, bptt_mode="sliding")
    stream_train_step(model, stream, segs, bptt_unroll=1, bptt_mode="sliding")
    assert torch.equal(ids, ids0) and torch.equal(labels, labels0)


def test_ignored_labels_carry_no_loss() -> None:
    model = tiny("rmt")
    ids = torch.randint(0, VOCAB, (B, L))
    labels = torch.full((B, L), IGNORE_INDEX)
    out = model(ids, labels, model.init_state())
    assert out.loss_sum.item() == 0.0 and out.n_tokens.item() == 0


def test_xl_cache_holds_the_last_xl_len_token_states_without_gradient() -> None:
    model = tiny("rmt_xl", xl_len=7)
    ids = torch.randint(0, VOCAB, (B, S * L))
    outputs, state = forward_segments(model, segments_of(ids))
    assert outputs[0].state.xl[0].shape == (B, L, 32)  # first segment: only its own L < 7 states
    assert len(state.xl) == 2 and all(c.shape == (B, 7, 32) and not c.requires_grad for c in state.xl)
    assert state.memory.shape == (B, 3, 32) and state.memory.requires_grad


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs (outside checkpointed
    regions, whose own hooks keep only their inputs)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("kind", ("rmt", "rmt_xl", "infinite"))
def test_activation_checkpointing_same_gradients_less_saved_memory(kind: str) -> None:
    ids = torch.randint(0, VOCAB, (B, S * L))
    results = []
    for ac in (False, True):
        model = tiny(kind, dropout=0.1, ac=ac)
        assert model.backbone.activation_checkpointing is ac
        torch.manual_seed(1)

        def loss() -> torch.Tensor:
            outputs, _ = forward_segments(model, segments_of(ids))
            return sum(o.loss_sum for o in outputs)

        saved, total = _saved_bytes(loss)
        total.backward()
        results.append((saved, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_saved, plain_grads), (ac_saved, ac_grads) = results
    for name in plain_grads:
        torch.testing.assert_close(ac_grads[name], plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert ac_saved < 0.6 * plain_saved, (ac_saved, plain_saved)


def test_elementwise_recompute_same_gradients_memory_between_none_and_all() -> None:
    """Selective recomputation keeps matmul/attention outputs: gradients exactly as without
    checkpointing, peak memory below no checkpointing and above recomputing everything."""
    from rmt_dist.train.metrics import peak_step_bytes

    ids = torch.randint(0, VOCAB, (4, 4 * L * 4))
    grads, peaks = {}, {}
    for name, ac, recompute in (("none", False, "all"), ("all", True, "all"), ("elementwise", True, "elementwise")):
        model = tiny("rmt", dropout=0.1, ac=ac, recompute=recompute)

        def step() -> None:
            torch.manual_seed(1)
            outputs, _ = forward_segments(model, [(ids[:, i:i + 4 * L], ids.roll(-1, 1)[:, i:i + 4 * L])
                                                  for i in range(0, ids.shape[1], 4 * L)])
            sum(o.loss_sum for o in outputs).backward()

        peaks[name] = peak_step_bytes(step, torch.device("cpu"))
        model.zero_grad()
        step()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in grads["none"]:
        torch.testing.assert_close(grads["elementwise"][name], grads["none"][name], rtol=1e-10, atol=1e-12, msg=name)
    assert peaks["all"] < peaks["elementwise"] < peaks["none"], peaks


@pytest.mark.parametrize("head_dim", (8, 7))
def test_rotary_scores_depend_only_on_relative_position(head_dim: int) -> None:
    from rmt_dist.model.backbone import apply_rotary, rotary_tables

    cos, sin = rotary_tables(12, head_dim, 10000.0, torch.device("cpu"), torch.float64)
    q, k = torch.randn(2, head_dim, dtype=torch.float64).unbind(0)

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rotary(q.view(1, 1, 1, -1), cos[i:i + 1], sin[i:i + 1])
        kj = apply_rotary(k.view(1, 1, 1, -1), cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(11, 8), rtol=1e-6, atol=1e-6)  # tables are fp32
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_odd_head_dim_model_runs_causally() -> None:
    """The paper's WikiText-103 width has 41-wide heads (410 / 10)."""
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = 30, 1, 2, 32
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.xl_len = "rmt_xl", 2, 4
    model = build_model(cfg, VOCAB).double().eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    changed = ids.clone()
    changed[:, L + 1] = (changed[:, L + 1] + 1) % VOCAB
    torch.testing.assert_close(all_logits(model, changed)[:, :L + 1], all_logits(model, ids)[:, :L + 1], **TIGHT)


@pytest.mark.parametrize("kind,m", [("rmt", 3), ("memtr", 3), ("rmt", 1)])
def test_block_causal_attention_equals_the_dense_mask(kind: str, m: int) -> None:
    """The structured mask the model uses without a cache is segment_mask's dense one."""
    model = tiny(kind, m=m).eval()
    write = m if kind == "rmt" else 0
    T = m + L + write
    structured = BlockCausal(m, write)
    dense = segment_mask(kind, m, L, 0)
    assert torch.equal(structured.dense(T), dense)
    x = torch.randn(B, T, 32, dtype=torch.float64, requires_grad=True)
    h1, _ = model.backbone(x, mask=structured)
    h2, _ = model.backbone(x, mask=dense)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-12)
    probe = torch.randn_like(h1)
    g1, g2 = (torch.autograd.grad((h * probe).sum(), x)[0] for h in (h1, h2))
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ("rmt", "rmt_xl", "xl"))
def test_state_owns_its_storage_not_the_segments_hidden_states(kind: str) -> None:
    """The carried memory and XL cache are copies: a view of the segment's output would keep the whole
    [B, T, d] hidden states alive in replay buffers, streams and checkpoints (torch.save writes the
    view's full storage)."""
    model = tiny(kind, xl_len=2)
    with torch.no_grad():
        _, state = forward_segments(model, segments_of(torch.randint(0, VOCAB, (B, S * L))))
    for tensor in state.tensors():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), tensor.shape


def test_rotary_tables_and_masks_are_built_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not every segment (nor every layer): each would be a handful of kernel launches per segment on a GPU."""
    from rmt_dist.model import backbone

    built = {"rope": 0, "mask": 0}
    tables, additive = backbone.rotary_tables, backbone._additive

    def count(name, fn):
        def counted(*args, **kwargs):
            built[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(backbone, "rotary_tables", count("rope", tables))
    monkeypatch.setattr(backbone, "_additive", count("mask", additive))
    model = tiny("rmt")
    for _ in range(2):
        forward_segments(model, segments_of(torch.randint(0, VOCAB, (B, S * L))))
    assert built == {"rope": 1, "mask": 1}
