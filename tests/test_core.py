"""Register tokens, nested dropout, every loss, the three design lines, configs and checkpoints, on
small random features (the frozen encoders are tested in test_encoders.py)."""
import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import core
import designs
import loop
from config import atomic_write
from core import Features, ModelConfig, NestedDropout, RegisterTokenModule
from registers import ReadIn

T, WIDTHS = 6, {"vision": 16, "touch": 12, "text": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**overrides) -> ModelConfig:
    values = dict(hidden_dim=32, n_registers=8, n_shared=2, n_layers=2, n_heads=4, embed_dim=16)
    return ModelConfig(**{**values, **overrides})


def paired_features(n=32, modalities=("vision", "touch"), seed=0) -> dict[str, Features]:
    """Each modality sees a different linear view of one latent per sample, plus noise; text is padded."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, T, 8, generator=g)
    out = {}
    for m in modalities:
        tokens = latent @ torch.randn(8, WIDTHS[m], generator=g) + 0.1 * torch.randn(n, T, WIDTHS[m], generator=g)
        mask = torch.ones(n, T, dtype=torch.bool)
        if m == "text":
            mask[:, T - 2:] = False  # padding
        out[m] = Features(tokens.mean(1), tokens, mask)
    return out


def build(cfg: ModelConfig, seed=0) -> core.AlignmentModel:
    torch.manual_seed(seed)
    return core.AlignmentModel(cfg, {m: WIDTHS[m] for m in cfg.modalities}, {m: T for m in cfg.modalities})


# ----------------------------------------------------------------------------------------------
# The prefix property: one forward pass yields the representation of every prefix length


def register_module(attention: str, R=8, readin=0) -> RegisterTokenModule:
    torch.manual_seed(0)
    return RegisterTokenModule(16, T, 32, R, n_layers=2, n_heads=4, attention=attention, readin_rank=readin).eval()


# the linear read-in (model.encoder_readin) gives every register its own map of the whole input: it must keep the
# prefix property and ignore padding as attention does
WITH_READIN = pytest.mark.parametrize("attention, readin", [("joint", 0), ("cross", 0), ("joint", 5), ("cross", 5)])


@WITH_READIN
def test_perturbing_later_registers_leaves_earlier_outputs_unchanged(attention, readin):
    module = register_module(attention, readin=readin)
    x = torch.randn(3, T, 16)
    with torch.no_grad():
        reference = module(x)
        for i in range(module.n_registers - 1):
            original = module.registers.data.clone()
            module.registers.data[i + 1:] += torch.randn_like(module.registers.data[i + 1:])
            perturbed = module(x)
            module.registers.data.copy_(original)
            torch.testing.assert_close(perturbed[:, :i + 1], reference[:, :i + 1], atol=1e-5, rtol=1e-5)
            assert (perturbed[:, i + 1:] - reference[:, i + 1:]).abs().max() > 1e-2  # the perturbation bites


@pytest.mark.parametrize("attention", ["joint", "cross"])
def test_read_in_reaches_only_the_registers_from_readin_from_on(attention):
    """model.readin_tokens: private gives the read-in to the private registers alone (readin_from = n_shared)."""
    torch.manual_seed(0)
    module = RegisterTokenModule(16, T, 32, 8, n_layers=2, n_heads=4, attention=attention, readin_rank=5,
                                 readin_from=3).eval()
    x = torch.randn(3, T, 16)
    with torch.no_grad():
        reference = module(x)
        for p in module.readin.parameters():
            p.add_(torch.randn_like(p))
        changed = module(x)
    torch.testing.assert_close(changed[:, :3], reference[:, :3], atol=1e-5, rtol=1e-5)
    assert ((changed[:, 3:] - reference[:, 3:]).abs().amax(-1) > 1e-3).all()  # every later register moved


@pytest.mark.parametrize("nested", [False, True])
def test_a_nested_read_in_gives_each_longer_prefix_of_registers_more_of_its_code(nested):
    """model.encoder_readin_shared_nested: register i of the shared read-in reads the code's first
    round(rank·(i+1)/n_out) numbers; plain, every register reads all of them."""
    torch.manual_seed(0)
    readin = ReadIn(8, 8, 4, 3, nested=nested)  # 8 inputs, a code of 8, 4 registers 3 wide: reaches 2, 4, 6, 8
    with torch.no_grad():
        readin[0].weight.copy_(torch.eye(8))  # the code is the input itself, so each code number can be moved alone
        readin[0].bias.zero_()
        x = torch.randn(5, 8)
        reference = readin(x)
        for j in range(8):
            moved = readin(x + torch.eye(8)[j] * 3)
            changed = (moved - reference).abs().amax((0, 2)) > 1e-3  # which registers moved
            # a weight masked to 0 adds exactly 0 to its sum whatever the summation order: unchanged is exact
            expected = [not nested or j < 2 * (i + 1) for i in range(4)]
            assert changed.tolist() == expected, (j, changed.tolist())
            for i in range(4):
                if not expected[i]:
                    assert torch.equal(moved[:, i], reference[:, i])


@WITH_READIN
def test_k_prefix_of_the_full_pass_equals_a_pass_with_only_k_registers(attention, readin):
    module = register_module(attention, readin=readin)
    x, mask = torch.randn(3, T, 16), torch.tensor([[True] * T, [True] * (T - 2) + [False] * 2, [True] + [False] * 5])
    with torch.no_grad():
        full = module(x, mask)
        for k in range(1, module.n_registers + 1):
            torch.testing.assert_close(module(x, mask, n_registers=k), full[:, :k], atol=1e-5, rtol=1e-5)


def test_joint_mask_features_never_see_registers():
    allowed = core.register_attention_mask(4, 3)
    assert not allowed[:4, 4:].any()  # features → registers: never
    assert allowed[:, :4].all()  # everyone → features
    assert torch.equal(allowed[4:, 4:], torch.ones(3, 3).tril().bool())  # register i → registers ≤ i


def test_joint_path_equals_one_masked_attention_over_features_and_registers():
    """The joint path skips what register_attention_mask throws away (features' attention to registers, the
    features' update in the last block): it must give what the whole mask over [features | registers] gives.
    float32 with another summation order over a few keys: agreement to ~1e-6, so 1e-5 would catch any change."""
    module = register_module("joint")
    x, mask = torch.randn(3, T, 16), torch.tensor([[True] * T, [True] * (T - 2) + [False] * 2, [True] + [False] * 5])
    R = module.n_registers
    with torch.no_grad():
        sequence = torch.cat([module.in_proj(x) + module.feature_pos, module.registers.expand(3, R, -1)], 1)
        allowed = core.register_attention_mask(T, R) & torch.cat([mask, torch.ones(3, R, dtype=torch.bool)], 1)[:, None]
        for block in module.blocks:
            sequence = block(sequence, allowed)
        torch.testing.assert_close(module(x, mask), module.norm(sequence[:, T:]), atol=1e-5, rtol=1e-5)


@WITH_READIN
def test_masked_input_tokens_have_no_influence(attention, readin):
    module = register_module(attention, readin=readin)
    x = torch.randn(2, T, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, 16) * 10
    with torch.no_grad():
        torch.testing.assert_close(module(changed, mask), module(x, mask), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(module(changed), module(x), atol=1e-3)  # unmasked, they do matter


@pytest.mark.parametrize("attention", ["joint", "cross"])
def test_attention_maps_are_distributions_over_real_input_tokens(attention):
    module = register_module(attention)
    mask = torch.tensor([[True] * T, [True] * 3 + [False] * 3])
    maps = module.attention_maps(torch.randn(2, T, 16), mask)
    assert maps.shape == (2, module.n_registers, T)
    assert (maps >= 0).all() and (maps[1, :, 3:] == 0).all()  # padding gets no attention
    mass = maps.sum(-1)
    if attention == "cross":  # features are all a register attends to
        torch.testing.assert_close(mass, torch.ones(2, module.n_registers))
    else:  # joint: the rest of the mass goes to registers ≤ i
        assert ((mass > 0) & (mass < 1)).all()


@pytest.mark.parametrize("design, attention, token_dim, readout, readin, readin_shared, per_k", [
    ("flextok", "joint", None, 0, 0, 0, False), ("fluxtalk", "cross", None, 0, 0, 0, False),
    ("flextok", "joint", 3, 0, 0, 0, False), ("flextok", "joint", None, 8, 0, 0, False),
    ("flextok", "joint", 3, 8, 6, 0, False), ("flextok", "joint", None, 8, 6, 0, True),
    ("flextok", "joint", 3, 8, 6, 2, True), ("flextok", "joint", None, 8, 6, "4 nested", True)])
def test_prefix_embeddings_and_reconstruction_from_one_pass_equal_k_register_passes(design, attention, token_dim,
                                                                                     readout, readin, readin_shared,
                                                                                     per_k):
    """With a linear read-out in the decoder too: a dropped token reaches it as zeros, what a pass without it gives
    (with a read-out per k, the k-register pass picks the same map by its number of tokens); with linear
    read-ins (the private registers', the shared ones'), register i's map of the input is the same whether later
    registers run or not."""
    nested = str(readin_shared).endswith("nested")
    cfg = small(design=design, attention=attention, n_shared=4, token_dim=token_dim, decoder_readout=readout,
                encoder_readin=readin, encoder_readin_shared=int(str(readin_shared).split()[0]),
                encoder_readin_shared_nested=nested, decoder_readout_solved=per_k)
    model = build(cfg).eval()
    feats = paired_features(4)["vision"]
    with torch.no_grad():
        if per_k:  # solved maps, at random
            model.decoders["vision"].make_solved_maps()
            for p in model.decoders["vision"].solved.parameters():
                p.normal_(std=0.1)
        tokens = model.tokens("vision", feats)
        assert tokens.shape == (4, 8, 32)
        embeddings = model.prefix_embeddings("vision", tokens, cfg.prefix_lengths)
        centre = feats.mean_token()
        recon = model.reconstruction_cosine("vision", tokens, feats, cfg.prefix_lengths, centre)
        for k in cfg.prefix_lengths:
            alone = model.tokens("vision", feats, n_registers=k)
            shared = alone[:, :min(k, cfg.n_shared)]
            torch.testing.assert_close(embeddings[k], model.heads["vision"](shared.mean(1)), atol=1e-5, rtol=1e-5)
            decoded = model.decoders["vision"](alone, torch.ones(4, k, dtype=torch.bool))
            expected = F.cosine_similarity(decoded - centre, feats.tokens - centre, dim=-1).mean(1)
            torch.testing.assert_close(recon[k], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings[4], embeddings[8])  # beyond n_shared nothing changes


def test_readout_per_k_reads_each_prefix_length_with_its_own_map():
    """Trained, one map reads every k, and the per-k maps are not there to train (nor in its checkpoints); once
    solved, a batch mixing prefix lengths decodes each row as it does alone, through the map of its k (changing the
    k = 8 map leaves the k = 1 rows alone and moves the k = 8 rows); k = 3, off the grid, uses the map of 4."""
    cfg = small(n_shared=4, decoder_readout=8, decoder_readout_solved=True)
    model = build(cfg)
    decoder = model.decoders["vision"]
    assert len(decoder.solved) == 0 and not any(".solved." in name for name in loop.checkpoint_tensors(model))
    decoder.make_solved_maps()
    assert len(decoder.solved) == len(cfg.prefix_lengths) == 4
    assert not any(p.requires_grad for p in decoder.solved.parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in decoder.solved.parameters():
            p.normal_(std=0.1)  # outputs of about unit scale
    decoder.eval()
    registers = torch.randn(4, 8, 32)
    keep = torch.arange(8)[None] < torch.tensor([1, 8, 3, 4])[:, None]
    with torch.no_grad():
        mixed = decoder(registers, keep)
        alone = torch.cat([decoder(registers[i:i + 1], keep[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)  # float32 sums of 256 terms: ~1e-6
        decoder.solved[-1][1].bias += 1.0  # the k = 8 map
        moved = decoder(registers, keep)
    torch.testing.assert_close(moved[[0, 2, 3]], mixed[[0, 2, 3]])
    assert (moved[1] - mixed[1]).abs().min() > 0.99
    with torch.no_grad():  # k = 3 and k = 4 read by the same map: moving it moves both
        decoder.solved[2][1].bias += 1.0
        moved_again = decoder(registers, keep)
    assert (moved_again[[2, 3]] - moved[[2, 3]]).abs().min() > 0.99
    torch.testing.assert_close(moved_again[[0, 1]], moved[[0, 1]])


def test_prefix_lengths():
    assert small(n_registers=8).prefix_lengths == [1, 2, 4, 8]
    assert small(n_registers=8, n_shared=3).prefix_lengths == [1, 2, 3, 4, 8]  # the full shared embedding too
    assert small(n_registers=12, nested_dropout="uniform").prefix_lengths == [1, 2, 4, 8, 12]
    assert small(n_registers=1, n_shared=1).prefix_lengths == [1]


# ----------------------------------------------------------------------------------------------
# Nested dropout


def kept_counts(mode, n=20000, R=8, rate=0.5):
    torch.manual_seed(0)
    keep = NestedDropout(R, mode, rate).train()(n)
    assert keep.shape == (n, R) and keep.dtype == torch.bool
    k = keep.sum(1)
    assert torch.equal(keep, torch.arange(R)[None] < k[:, None])  # always a prefix
    return keep, k


def test_power_of_two_keeps_1_2_4_8_equally_often():
    _, k = kept_counts("power_of_two")
    values, counts = k.unique(return_counts=True)
    assert values.tolist() == [1, 2, 4, 8]
    np.testing.assert_allclose(counts.numpy() / len(k), 0.25, atol=0.02)


def test_uniform_keeps_every_k_equally_often():
    _, k = kept_counts("uniform")
    values, counts = k.unique(return_counts=True)
    assert values.tolist() == list(range(1, 9))
    np.testing.assert_allclose(counts.numpy() / len(k), 1 / 8, atol=0.015)


def test_linear_drop_probability_rises_from_zero_to_the_rate():
    keep, _ = kept_counts("linear", rate=0.5)
    drop = 1 - keep.float().mean(0)
    np.testing.assert_allclose(drop.numpy(), 0.5 * np.arange(8) / 7, atol=0.015)
    assert drop[0] == 0 and (drop[1:] >= drop[:-1]).all()


def test_none_keeps_all():
    keep, _ = kept_counts("none")
    assert keep.all()


@pytest.mark.parametrize("mode", core.DROPOUT_MODES)
def test_dropout_is_off_in_eval_and_keep_k_forces_a_prefix(mode):
    dropout = NestedDropout(8, mode, 0.5)
    assert dropout.eval()(100).all()
    for training in (True, False):
        dropout.train(training)
        assert torch.equal(dropout(5, keep_k=3), torch.arange(8)[None].expand(5, -1) < 3)


def test_model_dropout_follows_train_and_eval():
    model = build(small(nested_dropout="uniform"))
    model.train()
    torch.manual_seed(0)
    assert not model.dropout(64).all()
    model.eval()
    assert model.dropout(64).all()


@pytest.mark.parametrize("per_pair", [False, True])
def test_nested_dropout_per_pair_gives_both_modalities_of_a_sample_one_prefix_length(per_pair):
    """model.nested_dropout_per_pair: a pair's embeddings are contrasted at the same k; drawn per modality, 64
    samples under power-of-two dropout over 8 registers (4 choices of k) all agree with probability 4^-64."""
    model = build(small(nested_dropout_per_pair=per_pair)).train()
    seen = {}

    def record(cfg, modality, tokens, keep):
        seen[modality] = keep[modality]
        return original(cfg, modality, tokens, keep)
    original = model.design.guard.preservation_input
    model.design.guard.preservation_input = record
    torch.manual_seed(0)
    model({m: f.batch(np.arange(64), torch.device("cpu")) for m, f in paired_features(64).items()})
    assert torch.equal(seen["vision"], seen["touch"]) == per_pair
    assert not seen["vision"].all()  # the draw dropped registers: a real test of the masks


# ----------------------------------------------------------------------------------------------
# Losses against direct computations


def direct_info_nce(a, b, temperature):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / temperature

    def cross_entropy_rows(z):
        return np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(z)])
    return (cross_entropy_rows(logits) + cross_entropy_rows(logits.T)) / 2


@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_info_nce_is_symmetric_clip_loss_with_temperature(temperature):
    torch.manual_seed(0)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    scale = torch.tensor(1 / temperature, dtype=torch.float64).log()
    loss = core.info_nce(a, b, scale)
    assert loss.item() == pytest.approx(direct_info_nce(a.numpy(), b.numpy(), temperature), rel=1e-10)
    assert core.info_nce(b, a, scale).item() == pytest.approx(loss.item(), rel=1e-12)
    assert core.info_nce(a, a, scale) < loss  # matched pairs cost less


def test_matryoshka_averages_info_nce_over_leading_dims():
    torch.manual_seed(1)
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    scale = torch.tensor(1 / 0.1, dtype=torch.float64).log()
    expected = np.mean([direct_info_nce(a[:, :d].numpy(), b[:, :d].numpy(), 0.1) for d in (2, 4, 8)])
    assert core.matryoshka_info_nce(a, b, scale, (2, 4, 8)).item() == pytest.approx(expected, rel=1e-10)


def test_preservation_is_one_minus_mean_cosine_over_real_tokens():
    torch.manual_seed(2)
    recon, target = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    r, t = recon.numpy(), target.numpy()
    cos = [(r[i, j] @ t[i, j]) / np.linalg.norm(r[i, j]) / np.linalg.norm(t[i, j])
           for i, j in [(0, 0), (0, 1), (1, 0)]]
    assert core.preservation_loss(recon, target, mask).item() == pytest.approx(1 - np.mean(cos), rel=1e-10)
    assert core.preservation_loss(3 * target, target, mask).item() == pytest.approx(0, abs=1e-12)


def test_centred_preservation_ignores_what_every_sample_shares():
    """Frozen features = a large common part + a small per-sample part. Rebuilding only the common part
    scores well on the raw cosine and at chance once both sides are measured from the mean feature."""
    g = torch.Generator().manual_seed(4)
    common = 10 * torch.randn(1, 5, 8, generator=g)
    target = common + torch.randn(64, 5, 8, generator=g)
    mask = torch.ones(64, 5, dtype=torch.bool)
    only_common = common.expand(64, -1, -1) + 0.01 * torch.randn(64, 5, 8, generator=g)
    centre = target.mean(0)
    assert core.preservation_loss(only_common, target, mask) < 0.05  # raw: looks nearly perfect
    assert core.preservation_loss(only_common, target, mask, centre) > 0.8  # centred: ~1, nothing kept
    assert core.preservation_loss(target, target, mask, centre) < 1e-6


def test_complementary_regularizer_is_l2_plus_squared_cosine_to_the_overlap():
    torch.manual_seed(3)
    comp, overlap = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    c, o = comp.numpy(), overlap.numpy()
    l2 = np.mean(c ** 2)
    cos2 = np.mean([((c[i, j] @ o[i]) / np.linalg.norm(c[i, j]) / np.linalg.norm(o[i])) ** 2
                    for i in range(2) for j in range(3)])
    assert core.complementary_regularizer(comp, overlap).item() == pytest.approx(l2 + cos2, rel=1e-10)
    # tokens orthogonal to the overlap pay only the L2 part
    orthogonal = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    loss = core.complementary_regularizer(orthogonal, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.5)
    # averaged over kept tokens only: dropping tokens (zeroed or not) does not dilute the penalty, so its
    # weight means the same whatever k nested dropout drew
    keep = torch.tensor([[True, False, False], [True, True, False]])
    kept = [(i, j) for i in range(2) for j in range(3) if keep[i, j]]
    expected = np.mean([np.mean(c[i, j] ** 2) + ((c[i, j] @ o[i]) / np.linalg.norm(c[i, j]) / np.linalg.norm(o[i])) ** 2
                        for i, j in kept])
    assert core.complementary_regularizer(comp, overlap, keep).item() == pytest.approx(expected, rel=1e-10)
    dropped_zeroed = comp * keep[..., None]
    assert core.complementary_regularizer(dropped_zeroed, overlap, keep).item() == pytest.approx(expected, rel=1e-10)


def constant_velocity_flow(c: torch.Tensor) -> core.FlowMatcher:
    flow = core.FlowMatcher(len(c), [("vision", "touch"), ("touch", "vision")], hidden=8)
    last = flow.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(c)
    return flow


def test_flow_loss_and_transport_with_a_known_velocity():
    torch.manual_seed(4)
    c = torch.tensor([0.5, -1.0, 2.0])
    flow = constant_velocity_flow(c)
    x_a, x_b = torch.randn(7, 3), torch.randn(7, 3)
    # v ≡ c: the rectified-flow loss is ‖c − (x_b − x_a)‖² averaged, whatever t is drawn
    expected = ((c - (x_b - x_a)) ** 2).mean()
    torch.testing.assert_close(flow.loss(x_a, x_b, "vision->touch"), expected)
    # Euler integration of v ≡ c over [0, 1] moves every (L2-normalised) start point by exactly c
    torch.testing.assert_close(flow.transport(x_a, "touch->vision", steps=5), F.normalize(x_a, dim=-1) + c)
    with pytest.raises(ValueError):
        flow.loss(x_a, x_b, "vision->text")


def test_flow_learns_to_transport_one_modality_onto_the_other():
    torch.manual_seed(5)
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    x_a = torch.randn(256, 4)
    x_b = x_a @ rotation + 1.0
    flow = core.FlowMatcher(4, [("vision", "touch")], hidden=64)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(150):
        loss = flow.loss(x_a, x_b, "vision->touch")
        opt.zero_grad()
        loss.backward()
        opt.step()
    error = (flow.transport(x_a, "vision->touch", steps=20) - x_b).norm(dim=1).mean()
    assert error < 0.5 * (x_a - x_b).norm(dim=1).mean()  # untrained: about 1×


def test_gather_with_grad_is_the_identity_on_one_process(tmp_path):
    x = torch.randn(4, 3, requires_grad=True)
    assert core.gather_with_grad(x) is x  # no process group
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gathered = core.gather_with_grad(x)
        (gathered * torch.arange(3.0)).sum().backward()
    finally:
        torch.distributed.destroy_process_group()
    assert torch.equal(gathered, x)
    torch.testing.assert_close(x.grad, torch.arange(3.0).expand(4, -1))


# ----------------------------------------------------------------------------------------------
# Configs and inputs that do not fit


@pytest.mark.parametrize("overrides, message", [
    (dict(n_registers=8, n_shared=9), "n_shared=9 must be between 1 and n_registers=8"),
    (dict(n_shared=0), "n_shared=0 must be between 1 and n_registers=8"),
    (dict(n_registers=12), "power-of-two n_registers, got 12.*n_registers=8"),
    (dict(loss_type="clip"), "unknown loss_type 'clip'.*contrastive"),
    (dict(attention="self"), "unknown attention 'self'.*joint"),
    (dict(design="mlp"), "unknown design 'mlp'.*flextok"),
    (dict(nested_dropout="random"), "unknown nested_dropout 'random'.*power_of_two"),
    (dict(modalities=("vision",)), r"modalities \('vision',\) must be at least two"),
    (dict(modalities=("vision", "smell")), "smell"),
    (dict(hidden_dim=30), "hidden_dim=30 is not divisible by n_heads=4"),
    (dict(mrl_dims=(8, 32)), r"mrl_dims \(8, 32\) must lie in 1..embed_dim=16"),
    (dict(encoder_readin=-1), r"model.encoder_readin=-1 is the rank .* give 0 \(none\) or a positive rank"),
    (dict(decoder_readout=2.5), r"model.decoder_readout=2.5 is the rank"),
    (dict(decoder_readout_solved=True), r"decoder_readout_solved: true .* decoder_readout=0 .* e.g. 128"),
    (dict(encoder_readin_shared=-1), r"model.encoder_readin_shared=-1 is the rank"),
    (dict(encoder_readin_shared=1, encoder_readin_shared_nested=True),
     r"encoder_readin_shared_nested: true .* n_shared=2 .* encoder_readin_shared=1 .* rank of at least 2"),
    (dict(encoder_readin=8, encoder_readin_shared=4, readin_tokens="all"),
     r"encoder_readin_shared=4 .* model.readin_tokens: private, or model.encoder_readin_shared: 0"),
])
def test_bad_model_config_names_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_non_power_of_two_registers_work_with_uniform_dropout():
    assert small(n_registers=12, nested_dropout="uniform").n_registers == 12


@pytest.mark.parametrize("design", core.DESIGNS)
def test_features_of_the_wrong_width_fail_clearly(design):
    cfg = small(design=design) if design != "adapter" else small(design="adapter", n_registers=1, n_shared=1)
    model = build(cfg)
    wrong = paired_features(4, modalities=("text",))["text"]  # 20 wide, the vision branch expects 16
    with pytest.raises(ValueError, match="20.*16"):
        model.tokens("vision", wrong)
    with pytest.raises(ValueError, match="no 'text' branch"):
        model.tokens("text", wrong)
    with pytest.raises(ValueError, match=r"no input features for modalities \['touch'\]"):
        core.AlignmentModel(cfg, {"vision": 16}, {"vision": T})


# ----------------------------------------------------------------------------------------------
# The three design lines and the three loss types train


DESIGN_CONFIGS = {
    "flextok": dict(design="flextok", attention="joint", nested_dropout="power_of_two", preservation_weight=0.5),
    "fluxtalk": dict(design="fluxtalk", attention="cross", n_registers=4, n_shared=3, nested_dropout="linear",
                     nested_dropout_rate=0.5, complementary_reg_weight=0.01, preservation_weight=0.0),
    "adapter": dict(design="adapter", n_registers=1, n_shared=1, nested_dropout="none", preservation_weight=0.0,
                    mrl_dims=(4, 8)),
}
EXPECTED_PARTS = {"contrastive": {"contrastive", "temperature"}, "combined": {"contrastive", "flow", "temperature"}}


def eval_loss(model, batch):
    model.eval()
    torch.manual_seed(123)  # the flow loss draws t
    with torch.no_grad():
        return model(batch)[0].item()


def fit(model, batch, steps=30) -> dict:
    """`steps` Adam steps on one batch; the loss parts of the last one."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, parts = model.train()(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    return parts


@pytest.mark.parametrize("loss_type", EXPECTED_PARTS)
@pytest.mark.parametrize("design", DESIGN_CONFIGS)
def test_every_design_and_loss_type_trains(design, loss_type):
    cfg = small(**DESIGN_CONFIGS[design], loss_type=loss_type, modalities=("vision", "touch", "text"))
    model = build(cfg)
    batch = paired_features(32, cfg.modalities)
    before, encoders = eval_loss(model, batch), copy.deepcopy(model.encoders)
    parts = fit(model, batch)
    expected = set(EXPECTED_PARTS[loss_type])
    expected |= {"preservation"} if cfg.preservation_weight else set()
    expected |= {"complementary"} if cfg.complementary_reg_weight else set()
    assert set(parts) == expected
    assert before - eval_loss(model, batch) > 0.2 * abs(before)  # abs: the uniformity term is negative
    assert hasattr(model, "flow") == (loss_type != "contrastive")
    # every loss type shapes the encoders (a loss that trains only its own head would leave them as built)
    moved = [(a - b).norm() / b.norm() for a, b in zip(model.encoders.parameters(), encoders.parameters())]
    assert min(moved) > 1e-3, f"an encoder parameter did not move under {loss_type}"


def test_fluxtalk_clones_registers_across_modalities_flextok_does_not():
    fluxtalk, flextok = build(small(**DESIGN_CONFIGS["fluxtalk"])), build(small())
    assert torch.equal(fluxtalk.encoders["vision"].registers, fluxtalk.encoders["touch"].registers)
    assert not torch.equal(flextok.encoders["vision"].registers, flextok.encoders["touch"].registers)


def test_contrastive_loss_of_the_model_is_info_nce_of_its_embeddings():
    cfg = small(nested_dropout="none", preservation_weight=0.0)
    model = build(cfg).eval()
    batch = paired_features(8)
    loss, parts = model(batch)
    emb = {m: model.prefix_embeddings(m, model.tokens(m, batch[m]), [8])[8] for m in cfg.modalities}
    torch.testing.assert_close(loss, core.info_nce(emb["vision"], emb["touch"], model.logit_scale))
    assert parts["temperature"].item() == pytest.approx(cfg.init_temperature, rel=1e-5)


def test_vision_text_aligner_and_train_alignment_seed_api():
    from data import ImageTextDataset, SynthTouch, create_dataloader, set_seed
    from train import train_alignment
    set_seed(0)
    cfg = core.AlignmentConfig(vision_model_name="synth-vision", text_model_name="all-MiniLM-L6-v2", d_align=32,
                               hidden_dim=64, mrl_dims=(8, 16, 64), learning_rate=3e-3, batch_size=16, num_epochs=2)
    aligner = core.VisionTextAligner(cfg)
    assert aligner.cfg.design == "adapter" and aligner.cfg.modalities == ("vision", "text")
    assert aligner.cfg.mrl_dims == (8, 16)  # prefixes shorter than d_align
    frozen = {k: v.clone() for k, v in aligner.encoders.state_dict().items()}
    loader = create_dataloader(ImageTextDataset.from_pairs(SynthTouch(32, image_size=64), image_size=64),
                               cfg.batch_size)
    history = train_alignment(aligner, loader, cfg.num_epochs)
    assert len(history["loss"]) == cfg.num_epochs and len(history["contrastive"]) == cfg.num_epochs
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert all(torch.equal(v, frozen[k]) for k, v in aligner.encoders.state_dict().items())
    assert not aligner.training
    batch = next(iter(loader))
    emb = aligner.embed("vision", batch["image"])
    assert emb.shape == (16, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(16))


# ----------------------------------------------------------------------------------------------
# Checkpoint helpers


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")

    def crash(tmp):
        tmp.write_text("half written")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_the_decoder_attends_among_its_queries_once_per_batch_and_computes_what_b_copies_compute():
    torch.manual_seed(0)
    decoder = core.FeatureDecoder(hidden_dim=32, output_dim=12, num_tokens=6, n_layers=2, n_heads=4)
    registers = torch.randn(5, 8, 32)
    keep = torch.arange(8)[None] < torch.tensor([1, 2, 4, 8, 3])[:, None]
    once = decoder(registers, keep)
    once.pow(2).sum().backward()
    grad_once = decoder.queries.grad.clone()
    decoder.zero_grad()
    # the reference: every sample carries its own copy of the queries through every block
    x, allowed = decoder.queries.expand(5, -1, -1), keep[:, None, :].expand(5, 6, 8)
    for block in decoder.blocks:
        x = block(x, None, registers, allowed)
    copies = decoder.out(x)
    copies.pow(2).sum().backward()
    # float32 sums in another order (one row instead of five, then a sum over the batch for the gradient):
    # values of order 1 agree to ~1e-6, so 1e-5 absolute / 1e-4 relative leaves room and still fails on any
    # real difference (a dropped block or mask changes them by order 1)
    torch.testing.assert_close(once, copies, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_once, decoder.queries.grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Leakage guards: what keeps a modality's private information out of its shared tokens

def test_stopgrad_guard_sends_reconstruction_gradient_to_private_tokens_only():
    model = build(small(leakage_guard="stopgrad"))
    tokens = {m: torch.randn(4, 8, 32, requires_grad=True) for m in ("vision", "touch")}
    keep = {m: torch.ones(4, 8, dtype=torch.bool) for m in tokens}
    model.decoders["vision"](*model.preservation_input("vision", tokens, keep)).pow(2).sum().backward()
    grad = tokens["vision"].grad
    assert grad[:, :model.cfg.n_shared].abs().max() == 0 and grad[:, model.cfg.n_shared:].abs().max() > 0
    assert tokens["touch"].grad is None


def test_cross_guard_rebuilds_a_modality_from_the_other_ones_shared_tokens():
    model = build(small(leakage_guard="cross"))
    S = model.cfg.n_shared
    tokens = {m: torch.randn(4, 8, 32) for m in ("vision", "touch")}
    keep = {"vision": torch.arange(8)[None].expand(4, -1) < 6, "touch": torch.arange(8)[None].expand(4, -1) < 2}
    registers, kept = model.preservation_input("vision", tokens, keep)
    assert torch.equal(registers[:, :S], tokens["touch"][:, :S]) and torch.equal(registers[:, S:], tokens["vision"][:, S:])
    assert torch.equal(kept[:, :S], keep["touch"][:, :S]) and torch.equal(kept[:, S:], keep["vision"][:, S:])


def test_decorrelation_penalty_is_high_for_copied_information_and_low_for_independent():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(256, 2, 16, generator=g)
    keep = torch.ones(256, 6, dtype=torch.bool)
    copied = torch.cat([shared, shared + 0.1 * torch.randn(256, 2, 16, generator=g),
                        torch.randn(256, 2, 16, generator=g)], 1)
    independent = torch.cat([shared, torch.randn(256, 4, 16, generator=g)], 1)
    high, low = core.decorrelation_penalty(copied, keep, 2), core.decorrelation_penalty(independent, keep, 2)
    # independent: each correlation ~ N(0, 1/256), so the mean square is ~1/256; copied: ~(1/2)² / 16 per entry
    assert low < 3 / 256 < high
    assert core.decorrelation_penalty(copied, torch.arange(6)[None].expand(256, -1) < 2, 2) == 0  # no private kept


@pytest.mark.parametrize("guard", core.LEAKAGE_GUARDS)
def test_every_leakage_guard_trains(guard):
    cfg = small(leakage_guard=guard)
    model = build(cfg)
    batch = paired_features(32)
    before = eval_loss(model, batch)
    parts = fit(model, batch)
    assert ("decorrelation" in parts) == (guard == "decorrelate")
    assert before - eval_loss(model, batch) > 0.2 * abs(before)


def test_alignment_removes_what_infonce_leaves_once_pairs_are_matched():
    """The reason for alignment_weight: a vision embedding = shared content + a private offset in a direction
    the touch embeddings never use. Pairs are already ranked first, so InfoNCE's gradient on the offset is
    almost nil; the confidence-weighted alignment term pulls it out at full strength."""
    g = torch.Generator().manual_seed(0)
    shared = F.normalize(torch.randn(64, 8, generator=g), dim=-1)
    touch = torch.cat([shared, torch.zeros(64, 1)], 1)
    offset = torch.full((64, 1), 0.5, requires_grad=True)  # a private factor, here a constant shift
    scale = torch.tensor(100.0).log()  # the clamped temperature the model trains at
    for loss_fn in (core.info_nce, core.alignment_loss):
        offset.grad = None
        loss_fn(torch.cat([shared, offset], 1), touch, scale).backward()
        pull = offset.grad.abs().mean().item()
        if loss_fn is core.info_nce:
            infonce_pull = pull
    # measured: InfoNCE ~1e-5, alignment ~0.7 (= d/dx of 2 − 2·cos with cos = 1/sqrt(1.25), times p ≈ 1)
    assert pull > 1000 * infonce_pull


def test_alignment_is_off_while_nothing_is_matched_and_zero_for_identical_pairs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    scale = torch.tensor(1 / 0.07).log()
    unmatched = core.alignment_loss(a, b, scale)
    # unrelated rows: p(positive) is about 1/64, so the term is ~2/64 of the plain alignment distance (~2)
    assert unmatched < 0.1
    assert core.alignment_loss(a, a.clone(), scale) < 1e-6
    # matched but apart (cosine 1/sqrt(1.25), so a distance of ~0.21 at p ≈ 1): pulled, ~7× the unmatched term
    assert core.alignment_loss(a, a + 0.5 * b, scale) > 5 * unmatched


def test_alignment_weight_adds_the_alignment_part():
    model = build(small(alignment_weight=1.0, leakage_guard="stopgrad"))
    model.train()
    _, parts = model(paired_features(16))
    assert "alignment" in parts and parts["alignment"] >= 0


def test_token_bottleneck_limits_each_token_to_token_dim_numbers():
    model = build(small(token_dim=3)).eval()
    with torch.no_grad():
        tokens = model.tokens("vision", paired_features(64)["vision"])  # 64×8×32
    for i in (0, 5):  # one token across 64 samples is an affine function of 3 numbers: centred, its rank is ≤ 3
        centred = tokens[:, i] - tokens[:, i].mean(0)
        singular = torch.linalg.svdvals(centred)
        assert singular[3] < 1e-4 * singular[0], singular[:5]  # float32 round-off, far below the 3 kept
    with pytest.raises(ValueError, match="token_dim=64 must lie in 1..hidden_dim=32"):
        small(token_dim=64)


def test_quantised_tokens_take_only_their_levels_and_pass_gradients_straight_through():
    levels = torch.tensor([8.0, 5.0, 2.0])
    z = (torch.randn(4096, 3, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    codes = core.finite_scalar_quantize(z, levels)
    for i, (n, grid) in enumerate(zip((8, 5, 2), ([j / 4 for j in range(-4, 4)], [-1, -0.5, 0, 0.5, 1], [-1, 0]))):
        # 4096 draws of N(0, 9) squashed by tanh reach every level; each level is a multiple of 1/(levels // 2),
        # exact in float32, so comparing sets of values is exact here
        assert sorted(set(codes[:, i].tolist())) == grid, (n, sorted(set(codes[:, i].tolist())))
    codes.sum().backward()  # rounding has no gradient: the straight-through estimator passes tanh's, which is
    # positive but underflows to 0 in float32 where tanh has saturated (|z| > ~9, a few of these draws)
    assert (z.grad >= 0).all() and (z.grad > 0).float().mean() > 0.95
    model = build(small(token_dim=3, token_levels=(8, 5, 5))).eval()
    with torch.no_grad():
        feats = paired_features(64)["vision"]
        raw = model.encoders["vision"](feats.tokens - model.feature_centres["vision"], feats.mask)
        code = model.bottlenecks["vision"].codes(raw)
    assert len({tuple(c) for c in code.flatten(0, 1).tolist()}) <= 8 * 5 * 5
    # bottleneck_tokens: shared rounds the shared tokens alone; the private ones are the register module's own
    model = build(small(token_dim=3, token_levels=(8, 5, 5), bottleneck_tokens="shared")).eval()
    with torch.no_grad():
        raw = model.encoders["vision"](feats.tokens - model.feature_centres["vision"], feats.mask)
        tokens = model.tokens("vision", feats)
    S = model.cfg.n_shared
    assert torch.equal(tokens[:, S:], raw[:, S:])  # the same tensor passed through: exact
    torch.testing.assert_close(tokens[:, :S], model.bottlenecks["vision"](raw[:, :S]))
    with pytest.raises(ValueError, match=r"token_levels=\[8, 5\].*token_dim=2 \(token_dim is 3\)"):
        small(token_dim=3, token_levels=(8, 5))
    with pytest.raises(ValueError, match="unknown bottleneck_tokens 'private'"):
        small(token_dim=3, bottleneck_tokens="private")


def test_fsq_warm_up_trains_on_unrounded_codes_until_round_after_and_evaluation_always_rounds():
    levels = torch.tensor([8.0, 5.0])
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    smooth, rounded = core.finite_scalar_quantize(z, levels, rounded=False), core.finite_scalar_quantize(z, levels)
    # the same scale: rounding moves each number by at most half a level step, 1 / (2 * (levels // 2))
    assert ((smooth - rounded).abs() <= 0.5 / (levels // 2) + 1e-6).all()
    assert len(set(smooth[:, 0].tolist())) > 8 and len(set(rounded[:, 0].tolist())) <= 8
    model = build(small(token_dim=2, token_levels=(8, 5), round_after=0.5))
    feats = paired_features(16)
    seen = []
    hp = argparse.Namespace(epochs=2, lr=1e-3, weight_decay=0.0, warmup_steps=1, grad_clip=1.0, seed=0, log_every=1)
    batches = [{m: f.batch(np.arange(i * 8, i * 8 + 8), torch.device("cpu")) for m, f in feats.items()}
               for i in range(2)]

    def loss_fn(batch):
        seen.append(model.bottlenecks["vision"].warming_up)  # what the step's forward pass used
        return model(batch)
    loop.fit(model, loss_fn, lambda epoch: batches, 2, hp)
    assert seen == [True, True, False, False]  # steps 0, 1 of 4 unrounded: round_after 0.5 of training
    model.before_step(0, 4)  # inside the warm-up again: training unrounded, evaluation rounded all the same
    with torch.no_grad():
        raw = model.encoders["vision"](feats["vision"].tokens - model.feature_centres["vision"], feats["vision"].mask)
        assert len(set(model.train().bottlenecks["vision"].codes(raw)[..., 0].flatten().tolist())) > 8
        assert len(set(model.eval().bottlenecks["vision"].codes(raw)[..., 0].flatten().tolist())) <= 8
    with pytest.raises(ValueError, match="round_after=0.5 .* together with token_levels"):
        small(round_after=0.5)


def test_feature_centres_start_at_the_training_mean_and_old_checkpoints_load_as_zero_centres():
    model = build(small())
    feats = paired_features(32)
    model.set_feature_centres(feats)
    torch.testing.assert_close(model.feature_centres["vision"], feats["vision"].tokens.mean(0))
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("feature_centres.")}
    completed = model.complete_state(old)
    assert (completed["feature_centres.touch"] == 0).all() and "feature_centres.touch" not in old
    assert "feature_centres.vision" in model.no_weight_decay()


def test_the_preservation_loss_measures_from_the_fixed_training_mean_not_the_learned_centre(monkeypatch):
    """The learned centre drifts in training (the default's touch centre by 0.2 against 0.46 of a sample's spread
    around the mean); the preservation loss measures reconstruction and target from the training mean, fixed."""
    model = build(small())
    feats = paired_features(32)
    model.set_feature_centres(feats)
    with torch.no_grad():
        model.feature_centres["vision"].add_(1.0)  # as training moves the learned centre
    centres = []
    monkeypatch.setattr(designs, "preservation_loss", lambda recon, target, mask, centre: centres.append(centre) or
                        (recon - target).pow(2).mean())
    model.train()(feats)
    torch.testing.assert_close(centres[0], feats["vision"].tokens.mean(0))
    # saved with the weights; a checkpoint from before measured from its centres, as it was trained
    tensors = loop.checkpoint_tensors(model)
    assert "feature_means.vision" in tensors and not tensors["feature_means.vision"].requires_grad
    old = {k: v for k, v in tensors.items() if not k.startswith("feature_means.")}
    assert torch.equal(model.complete_state(old)["feature_means.vision"], old["feature_centres.vision"])
