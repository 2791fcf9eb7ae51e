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
