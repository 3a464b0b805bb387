"""Hard edges of the quantizers and the layer (issue 11): empty and odd inputs, bad arguments,
fp16, the RHT basis width, one-time notices."""

import logging

import pytest
import reference as ref
import torch
from models import tiny

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear, fake_quantize_nvfp4, hadamard_transform, quantize_nvfp4
from hf_nvfp4.formats import _common, get_format

# --------------------------------------------------------------------------- 8: empty batches


def test_empty_batch_behaves_like_nn_linear():
    layer = NVFP4Linear(64, 32)
    ref = torch.nn.Linear(64, 32)
    x = torch.randn(0, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == ref(x).shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.equal(layer.weight.grad, torch.zeros(32, 64)) and torch.equal(layer.bias.grad, torch.zeros(32))
    assert layer(torch.randn(2, 0, 64)).shape == (2, 0, 32)


@pytest.mark.parametrize("shape", [(4, 0), (0, 16), (0, 0), (3, 0, 5), (2, 0)])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_empty_tensors_quantize_to_empty(shape, tile):
    x = torch.randn(shape)
    q = quantize_nvfp4(x, tile=tile)
    assert q.dequantize().shape == x.shape
    assert fake_quantize_nvfp4(x, tile=tile).shape == x.shape
    for name in ("mxfp4", "mxfp8", "fp8_block", "fp8_tensor"):
        assert get_format(name).fake_quantize(x).shape == x.shape, name


# --------------------------------------------------------------------------- 8: bad arguments


def test_generator_that_is_not_a_generator_is_a_type_error():
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*got int.*manual_seed"):
        fake_quantize_nvfp4(x, stochastic=True, generator=123)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        quantize_nvfp4(x, stochastic=True, generator="seed")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        get_format("mxfp4").fake_quantize(torch.randn(4, 32), stochastic=True, generator=7)


@pytest.mark.parametrize("tile", ["16", "1,16", (1, 16, 1), 16, (1,), ("a", "b")])
def test_tile_must_be_a_pair(tile):
    with pytest.raises(ValueError, match=r"tile must be a pair of ints such as \(1, 16\)") as e:
        fake_quantize_nvfp4(torch.randn(4, 16), tile=tile)
    assert repr(tile) in str(e.value)


def test_amax_that_requires_grad_gives_detached_results():
    t = torch.tensor(3.0, requires_grad=True)
    x = torch.randn(4, 16)
    y = fake_quantize_nvfp4(x, amax=t)
    assert not y.requires_grad and y.grad_fn is None
    assert not quantize_nvfp4(x, amax=t).amax.requires_grad
    assert torch.equal(y, fake_quantize_nvfp4(x, amax=3.0))


def test_non_contiguous_inputs():
    base = torch.randn(64, 48)
    x = base.t()  # [48, 64], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(fake_quantize_nvfp4(x), fake_quantize_nvfp4(x.contiguous()))
    assert torch.equal(quantize_nvfp4(x[:, ::2]).data, quantize_nvfp4(x[:, ::2].contiguous()).data)
    layer = NVFP4Linear(64, 32)
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    b = layer(x.contiguous())
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- 6: the RHT basis


@pytest.mark.parametrize("k", [20, 33, 8])
def test_rht_keeps_the_padded_basis(k):
    torch.manual_seed(3)
    x = torch.randn(24, k)
    kp = -(-k // 16) * 16
    y = fake_quantize_nvfp4(x, rht=True)
    assert y.shape == (24, kp)
    deq = quantize_nvfp4(x, rht=True).dequantize()
    assert torch.equal(deq, y)
    # the same as transforming the zero-padded input
    padded = torch.nn.functional.pad(x, (0, kp - k))
    assert torch.equal(y, fake_quantize_nvfp4(padded, rht=True))
    # and that is the numpy reference of the zero-padded input, bit for bit
    codes, scale, amax = ref.nvfp4(padded, rht=True)
    assert torch.equal(y, torch.from_numpy(ref.nvfp4_dequant(codes, scale, amax)))


def test_rht_of_a_multiple_of_16_is_unchanged():
    x = torch.randn(8, 32)
    assert fake_quantize_nvfp4(x, rht=True).shape == x.shape
    assert torch.equal(fake_quantize_nvfp4(x, rht=True), quantize_nvfp4(x, rht=True).dequantize())
    assert hadamard_transform(x).shape == x.shape


# --------------------------------------------------------------------------- 3: fp16


def test_half_layer_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    layer = NVFP4Linear(64, 64).half()
    x = torch.randn(8, 64).half()
    ref = NVFP4Linear(64, 64)  # fp32 emulation on the same (fp16-representable) values
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    want = ref(x.float())
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert ((y.float() - want).norm() / want.norm()).item() < 1e-3
    y.float().pow(2).sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def _loss(model, ids, dtype):
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item()


def test_fp16_autocast_llama_matches_bf16_emulation():
    cfg = NVFP4Config(bf16_first_blocks=0, bf16_last_blocks=0)
    model = hf_nvfp4.from_config(tiny("llama", 2).config, cfg)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    base = tiny("llama", 2)  # the same weights unconverted (tiny() seeds)
    ref = base(input_ids=ids, labels=ids).loss.item()
    bf16 = _loss(model, ids, torch.bfloat16)
    fp16 = _loss(model, ids, torch.float16)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert abs(fp16 - bf16) / bf16 < 0.02, (fp16, bf16, ref)
    half = hf_nvfp4.from_config(tiny("llama", 2).config, cfg, dtype=torch.float16)  # HF refuses .half() here
    half.load_state_dict({k: v.half() for k, v in model.state_dict().items()})
    loss = half(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - bf16) / bf16 < 0.02, (loss.item(), bf16)


# --------------------------------------------------------------------------- 9: one-time notices


def test_generate_does_not_build_wgrad_operands_or_repeat_notices(monkeypatch, caplog):
    monkeypatch.setattr(_common, "_said", set())
    model = hf_nvfp4.from_config(tiny("llama", 2).config, NVFP4Config(bf16_last_blocks=0))
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    for _ in range(3):
        model.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=2, do_sample=False)
    assert not [r for r in caplog.records if "zero-padding" in r.getMessage()]
    quantize_nvfp4(torch.randn(4, 20))
    quantize_nvfp4(torch.randn(4, 20))
    assert len([r for r in caplog.records if "zero-padding" in r.getMessage()]) == 1


def test_notices_only_on_rank_zero(monkeypatch, caplog):
    monkeypatch.setattr(_common, "_said", set())
    monkeypatch.setenv("RANK", "1")
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    quantize_nvfp4(torch.randn(4, 20))
    assert not caplog.records
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(_common, "_said", set())
    quantize_nvfp4(torch.randn(4, 20))
    assert len(caplog.records) == 1
