"""response_logprobs (hidden states + output layer, never the logits) against each model's own forward, for
architectures that process their logits: Gemma 2's soft-capping, Cohere's scale, Granite's divisor."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from fastrlhf.models import logit_processing, response_logprobs

V = 97
COMMON = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=0.7)),
    "cohere": ("CohereConfig", dict(logit_scale=3.0)),
    "granite": ("GraniteConfig", dict(logits_scaling=0.25)),
}


def tiny(arch: str) -> torch.nn.Module:
    name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, name)(**COMMON, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # logits of several units, where capping and scaling change the softmax a lot
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_the_models_own_logits(backend, arch, temperature):
    model = tiny(arch)
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    start = 4
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
        expected = torch.log_softmax(logits.double()[:, start - 1 : -1] / temperature, -1)
        expected = expected.gather(-1, ids[:, start:, None]).squeeze(-1)
        got = response_logprobs(model, ids, mask, start, temperature=temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    if arch != "llama":  # the processing matters here: ignoring it would be far off
        plain = torch.log_softmax(
            (
                model.model(input_ids=ids, attention_mask=mask).last_hidden_state @ model.lm_head.weight.t()
            ).double()[:, start - 1 : -1]
            / temperature,
            -1,
        ).gather(-1, ids[:, start:, None])
        assert (plain.squeeze(-1) - expected).abs().max() > 0.1


def test_logit_processing_reads_the_config():
    cfg = transformers.PretrainedConfig(final_logit_softcapping=30.0, logits_scaling=8.0)
    assert logit_processing(cfg) == {"softcap": 30.0, "logit_scale": 0.125}
    assert logit_processing(transformers.PretrainedConfig()) == {"softcap": None, "logit_scale": None}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_suppressed_ids_give_the_sampled_distribution(backend, arch):
    """With ``suppress_ids`` the log-probs, entropy and gradients are those of the softmax without those ids
    (what the sampler draws from), where a suppressed id holds a large share of the mass too, and they stay
    finite at positions whose target is itself suppressed (padding after EOS)."""
    model = tiny(arch)
    suppress, start, temperature = (0, 5), 4, 0.8
    torch.manual_seed(1)
    ids = torch.randint(6, V, (2, 9))
    ids[0, -2:] = 0  # pad targets
    mask = torch.ones_like(ids)
    head = model.get_output_embeddings().weight
    with torch.no_grad():  # token 5's row along the mean hidden state: it takes much of the mass
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, start - 1 : -1]
        direction = h.reshape(-1, h.shape[-1]).mean(0)
        head[5] = direction / direction.norm() ** 2 * 0.8 * (h @ head.t()).amax(-1).mean()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, start - 1 : -1] / temperature
    full = torch.log_softmax(logits, -1)
    logq = torch.log_softmax(full.index_fill(-1, torch.tensor(suppress), -torch.inf), -1)
    expected = logq.gather(-1, ids[:, start:, None]).squeeze(-1)
    expected_entropy = -(logq.exp() * logq.nan_to_num(neginf=0.0)).sum(-1)
    kept = 1 - full[..., list(suppress)].exp().sum(-1)
    real = kept > 1e-2  # fp32 cannot resolve log(1 - P) as P -> 1: its error grows as 1e-7 / (1 - P)
    real[0, -2:] = False
    assert ((kept < 0.98) & real).any(), "the test needs positions where the suppressed mass matters"
    got, entropy = response_logprobs(
        model, ids, mask, start, temperature=temperature, return_entropy=True, suppress_ids=suppress
    )
    assert torch.isfinite(got).all() and torch.isfinite(entropy).all()
    # fp32 logits differ from the model's own by a few ulps of their size (Granite's are scaled up 4x).
    atol = max(1e-5, 2e-6 * logits.detach().abs().amax().item())  # 17 ulps of the largest logit
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=atol)
    torch.testing.assert_close(entropy[real], expected_entropy[real], rtol=1e-5, atol=atol)
    (want,) = torch.autograd.grad(expected[real].sum(), head)
    logp = response_logprobs(model, ids, mask, start, temperature=temperature, suppress_ids=suppress)
    (have,) = torch.autograd.grad(logp[real].sum(), head)
    # log q = log p - log(1 - P): the gradients cancel (exactly, for the suppressed rows), so their fp32
    # error grows with the logits too: 1.3e-5 of the largest gradient for Granite's, against f64.
    torch.testing.assert_close(
        have, want, rtol=1e-4, atol=max(1e-4, 1e-5 * logits.detach().abs().amax().item())
    )
