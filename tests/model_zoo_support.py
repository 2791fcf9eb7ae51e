"""The architecture zoo: every architecture in transformers' causal-LM mapping, built tiny from its own
default config (random weights), loaded through fastrlhf's loaders and compared with the model's own forward.

    python -m tests.model_zoo_support [--write benchmarks/results/model_zoo.md] [model_type ...]

Each architecture ends as one of
- ok: policy log-probs (with gradients, at a temperature, with and without the suppressed pad token),
  reference log-probs (no gradients), reward-model scores and critic values all equal the model's own
  forward in fp32;
- refused: a loader raised ``UnsupportedModel`` at load (the one-line reason is reported);
- not buildable tiny: the shrunken config, its model or the model's own forward failed before fastrlhf ran;
- wrong / crash: fastrlhf disagreed with the model, or failed on it. The test allows neither.

Sequences are PPO's: a left-padded prompt and a right-padded response. The output layer is scaled so that the
largest logit is about 30 (random weights give logits near 0, where soft-capping or a scale would not show).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models
from transformers import CONFIG_MAPPING, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fastrlhf.architectures import attention_implementation, has_scalar_head_added
from fastrlhf.config import ModelConfig
from fastrlhf.data import ensure_pad_token
from fastrlhf.model_check import SKIP_HINT, UnsupportedModel, own_trunk_output
from fastrlhf.models import (
    load_causal_lm,
    load_scalar_model,
    position_ids,
    response_logprobs,
    scalar_head,
    sequence_scores,
    takes_position_ids,
    token_values,
)

VOCAB = 512
MAX_PARAMS = 20_000_000
TOLERANCE = 1e-4  # fp32: log-probs of logits up to ~30, and scores
TEMPERATURE = 0.7

# Every integer field named here is set to (at most) this value, in the config and in its sub-configs.
_SIZES = {
    64: "hidden_size n_embd d_model dim embed_dim n_embed embedding_size word_embed_proj_dim emb_dim "
    "input_embedding_size output_embedding_size backbone_hidden_size lru_width attention_hidden_size "
    "router_hidden_size",
    128: "intermediate_size ffn_dim n_inner decoder_ffn_dim encoder_ffn_dim d_ff dim_ff ffn_hidden_size "
    "intermediate_size_mlp dense_intermediate_size feed_forward_size d_inner dff",
    32: "moe_intermediate_size shared_expert_intermediate_size expert_ffn_hidden_size "
    "shared_intermediate_size moe_shared_expert_intermediate_size shared_experts_intermediate_size "
    "q_lora_rank o_lora_rank adapter_rank",
    2: "num_key_value_heads num_kv_heads num_experts_per_tok num_experts_per_token moe_k moe_topk "
    "linear_num_key_heads num_query_groups",
    4: "num_attention_heads n_head n_heads num_heads decoder_attention_heads encoder_attention_heads "
    "num_experts n_routed_experts num_local_experts moe_num_experts linear_num_value_heads index_n_heads "
    "linear_num_heads",
    16: "head_dim attention_head_dim d_head dim_head kv_channels attention_head_size qk_head_dim v_head_dim "
    "kv_lora_rank linear_key_head_dim linear_value_head_dim mamba_d_state state_size ssm_state_size "
    "mamba_d_head mamba_head_dim mamba_headdim linear_head_dim index_head_dim mamba_chunk_size chunk_size "
    "hidden_size_per_layer_input",
    8: "qk_rope_head_dim qk_nope_head_dim time_step_rank mamba_dt_rank index_topk rotary_dim",
    VOCAB: "vocab_size vocab_size_per_layer_input unpadded_vocab_size encoder_hash_byte_group_vocab",
}
SIZES = {name: value for value, names in _SIZES.items() for name in names.split()}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
AT_MOST_ONE = (
    "n_group", "topk_group", "num_expert_group", "n_shared_experts", "num_shared_experts",
    "first_k_dense_replace", "num_dense_layers",
)  # fmt: skip
AT_MOST_ZERO = ("num_kv_shared_layers",)
NOT_SHRUNK = ("id2label", "label2id", "rope_parameters", "rope_scaling", "compress_rates")

# What the generic shrinking cannot guess: constraints between fields of one architecture.
OVERRIDES: dict[str, dict] = {
    "mamba2": dict(num_heads=8),  # heads x head_dim = expand x hidden
    "bamba": dict(mamba_n_heads=8),
    "granitemoehybrid": dict(mamba_n_heads=8),
    "dots1": dict(n_shared_experts=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "xmod": dict(default_language="en_XX"),
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2
    ),
    "zamba2": dict(attention_hidden_size=128, attention_head_dim=32, kv_channels=32),
    "reformer": dict(
        axial_pos_embds_dim=[32, 32],
        axial_pos_shape=[4, 8],
        max_position_embeddings=32,
        attn_layers=["local", "local"],
        local_attn_chunk_length=4,
    ),
}
OVERRIDES["dots3_note_text"] = dict(head_dim=16)  # sliding-window heads: qk_nope_head_dim + qk_rope_head_dim
for composite in ("qwen4_exp", "dots3_note"):
    OVERRIDES[composite] = {"text_config": OVERRIDES[composite + "_text"]}


class NotBuildable(Exception):
    """The architecture could not be built tiny (before any fastrlhf code ran)."""


def shrink(d: dict, depth: int = 0) -> dict:
    """Overrides that make the config ``d`` (a ``to_dict()``) tiny: sizes capped, few layers kept.

    Per-layer lists keep one layer of each distinct kind (and at least two layers), so hybrid models keep
    their attention and their recurrent layers.
    """
    out: dict = {}
    n_layers = next((d[k] for k in LAYER_COUNTS if isinstance(d.get(k), int)), None)
    per_layer = {
        k: v
        for k, v in d.items()
        if n_layers and isinstance(v, list) and len(v) == n_layers and k != "architectures"
    }
    keep = list(range(min(n_layers or 0, 2)))
    if per_layer:
        first: dict = {}
        for i in range(n_layers):
            first.setdefault(tuple(str(v[i]) for v in per_layer.values()), i)
        last = max(first.values())  # the first layers up to the last new kind, else one of each kind
        keep = list(range(max(last + 1, len(keep)))) if last < 6 else sorted(set(first.values()) | set(keep))
    for k in LAYER_COUNTS:
        if isinstance(d.get(k), int):
            out[k] = len(keep)
    for k, v in d.items():
        if k in out or isinstance(v, bool):
            continue
        if k in per_layer:
            out[k] = [min(v[i], SIZES[k]) if k in SIZES and isinstance(v[i], int) else v[i] for i in keep]
        elif k == "per_layer_config" and isinstance(v, dict):
            out[k] = {
                f"{keep.index(int(i)):02d}": shrink(c, depth + 1) for i, c in v.items() if int(i) in keep
            }
        elif isinstance(v, dict) and depth < 3 and k not in NOT_SHRUNK:
            out[k] = shrink(v, depth + 1)
        elif k in SIZES and (v is None or isinstance(v, int)):
            out[k] = SIZES[k] if k.startswith("vocab_size") or v is None else min(v, SIZES[k])
        elif k in AT_MOST_ONE and isinstance(v, int):
            out[k] = min(v, 1)
        elif k in AT_MOST_ZERO and isinstance(v, int):
            out[k] = 0
        elif k.endswith(("token_id", "token_index")) and isinstance(v, int) and v >= VOCAB - 16:
            out[k] = VOCAB - 1 - sum(map(ord, k)) % 12  # special ids at the top of the vocabulary
    # Multi-head latent attention: the rotary part is the head_dim; and keep MHA, GQA or MQA as it was.
    if "qk_rope_head_dim" in out and "head_dim" in out:
        out["head_dim"] = out["qk_rope_head_dim"]
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and "num_attention_heads" in out:
        out["num_key_value_heads"] = max(1, out["num_attention_heads"] * kv // heads)
    return out


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The architecture's default config, shrunk. Its own config class, or where the causal-LM class takes
    another one (MusicGen's decoder config), that one."""
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    for cls in dict.fromkeys([CONFIG_MAPPING[model_type], model_cls.config_class]):
        try:
            defaults = cls().to_dict()
        except Exception:
            defaults = {}
        kwargs = shrink(defaults)
        kwargs["is_decoder"] = True
        for k, v in OVERRIDES.get(model_type, {}).items():
            kwargs[k] = {**kwargs.get(k, {}), **v} if isinstance(v, dict) else v
        config = cls(**kwargs)
        try:
            with torch.device("meta"):
                model_cls._from_config(config)
            return config
        except Exception as e:
            error = e
    raise error


def tiny_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """``size`` word tokens, EOS among them, no pad token (``ensure_pad_token`` adds one, id ``size``)."""
    vocab = {f"t{i}": i for i in range(size)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0", eos_token="t2"
    )


@dataclass
class Result:
    model_type: str
    status: str  # ok | refused | not buildable tiny | wrong | crash
    detail: str = ""
    logits_path: str = ""  # fused | model
    attention: str = ""
    scalar_class: str = ""
    seconds: float = 0.0


def _batch(n_real: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PPO's layout: [left-padded prompt | right-padded response], 3 rows x 10 tokens, response from 5; pad
    positions hold the pad id (``n_real``, the tokenizer's added pad token)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, n_real, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    mask[1, -2:] = 0
    return ids.masked_fill(mask == 0, n_real), mask, 5


def _own_logits(model, ids, mask):
    kwargs = {"position_ids": position_ids(mask)} if takes_position_ids(model) else {}
    return model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits


def _build(model_type: str, workdir: Path) -> int:
    """Tiny model saved under ``workdir``; returns how many real tokens the tokenizer gets (pad id next)."""
    try:
        config = tiny_config(model_type)
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        attention = attention_implementation("auto", cls, torch.device("cpu"), torch.float32)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in cls._from_config(config).parameters())
        if n_params > MAX_PARAMS:
            raise NotBuildable(f"{n_params / 1e6:.0f}M parameters after shrinking")
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation=attention).eval()
        head = model.get_output_embeddings()
        rows = model.get_input_embeddings().num_embeddings
        if isinstance(getattr(head, "weight", None), torch.Tensor):
            rows = min(rows, head.weight.shape[0])
        n_real = rows - 16
        ids, mask, _ = _batch(n_real)
        with torch.no_grad():
            peak = _own_logits(model, ids, mask).float().abs().max()
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            model.save_pretrained(workdir)  # no single output layer: fastrlhf's loader has to say so
            return n_real
        with torch.no_grad():
            head.weight.mul_(30.0 / max(float(peak), 1e-3))  # logits of ~30 (tied embeddings scale too)
            # The pad token (id n_real, added by ensure_pad_token) as transformers initializes an added
            # token's row: the mean of the others.
            head.weight[n_real] = head.weight[:n_real].mean(0)
            _own_logits(model, ids, mask)
        model.save_pretrained(workdir)
    except NotBuildable:
        raise
    except Exception as e:
        raise NotBuildable(_one_line(e)) from e
    return n_real


def _one_line(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{where}"


def _diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()[where]
    return float(d.max()) if d.numel() else 0.0


def compare(model_type: str, workdir: Path) -> Result:
    """Load the saved tiny model as policy and reward model; compare every path with the model's forward."""
    n_real = _build(model_type, workdir)
    tok = tiny_tokenizer(n_real)
    ensure_pad_token(tok)
    cfg = ModelConfig(dtype="float32")
    cpu = torch.device("cpu")
    policy = load_causal_lm(str(workdir), cfg, cpu, tok, trainable=True)
    result = Result(
        model_type, "ok", logits_path=getattr(policy, "fastrlhf_logits_path", ""),
        attention=policy.config._attn_implementation,
    )  # fmt: skip
    ids, mask, start = _batch(n_real)
    targets = ids[:, start:]
    valid = mask[:, start:].bool() & mask[:, start - 1 : -1].bool()
    with torch.no_grad():
        out: list[torch.Tensor] = []
        trunk_output = own_trunk_output(policy, lambda: out.append(_own_logits(policy, ids, mask)))
        logits = out[0][:, start - 1 : -1].float() / TEMPERATURE
    own = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    pad = tok.pad_token_id
    own_suppressed = torch.log_softmax(logits.index_fill(-1, torch.tensor([pad]), -math.inf), -1)
    own_suppressed = own_suppressed.gather(-1, targets[..., None]).squeeze(-1)
    errors = {}
    logp = response_logprobs(policy, ids, mask, start, temperature=TEMPERATURE)
    errors["policy"] = _diff(logp, own, valid)
    logp[valid].sum().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    if not grads or not all(torch.isfinite(g).all() for g in grads):
        errors["policy gradient"] = math.inf
    with torch.no_grad():
        ref = response_logprobs(policy, ids, mask, start, temperature=TEMPERATURE)
        errors["reference"] = _diff(ref, own, valid)
        ref = response_logprobs(policy, ids, mask, start, temperature=TEMPERATURE, suppress_ids=(pad,))
        errors["suppressed pad"] = _diff(ref, own_suppressed, valid)

    rm = load_scalar_model(str(workdir), cfg, cpu, tok, trainable=False)
    result.scalar_class = type(rm).__name__
    head = scalar_head(rm)
    with torch.no_grad():
        from_policy = head(trunk_output).squeeze(-1).float()  # the policy's trunk, read by the RM's head
        last = (mask.bool() * torch.arange(mask.shape[1])).argmax(-1)
        scores = sequence_scores(rm, ids, mask) - float(rm.config.reward_bias)
        errors["rm vs policy trunk"] = _diff(
            scores, from_policy[torch.arange(3), last], torch.ones(3, dtype=bool)
        )
        if not has_scalar_head_added(rm):
            own_scores = _own_logits(rm, ids, mask).float().reshape(3, -1)[:, 0]
            errors["rm"] = _diff(scores, own_scores, torch.ones(3, dtype=bool))
        values = token_values(rm, ids, mask, start)
        errors["critic"] = _diff(values, from_policy[:, start - 1 : -1], valid)
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    if bad:
        result.status = "wrong"
        result.detail = ", ".join(f"{k} off by {v:.2g}" for k, v in bad.items())
    return result


def check(model_type: str) -> Result:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = compare(model_type, Path(tmp))
        except NotBuildable as e:
            result = Result(model_type, "not buildable tiny", str(e))
        except UnsupportedModel as e:
            result = Result(model_type, "refused", " ".join(str(e).removesuffix(SKIP_HINT).split()))
        except Exception as e:
            result = Result(model_type, "crash", _one_line(e))
    result.seconds = time.perf_counter() - t0
    return result


def model_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@contextlib.contextmanager
def quiet():
    """transformers' and fastrlhf's warnings about tiny random models, silenced."""
    loggers = [logging.getLogger("fastrlhf"), logging.getLogger("transformers")]
    levels = [lg.level for lg in loggers]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run(names: list[str] | None = None, progress=None) -> list[Result]:
    """Check each architecture, one thread (tiny matrices: more threads only wait on a shared machine)."""
    os.environ.setdefault("FASTRLHF_KERNELS", "torch")
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet():
            for name in names or model_types():
                results.append(check(name))
                if progress:
                    progress(results[-1])
    finally:
        torch.set_num_threads(threads)
    return results


def markdown(results: list[Result]) -> str:
    counts = {
        s: sum(r.status == s for r in results)
        for s in ("ok", "refused", "not buildable tiny", "wrong", "crash")
    }
    lines = [
        "# Architecture zoo",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}: every architecture in the "
        "causal-LM mapping, built tiny from its default config with random weights (fp32, CPU), loaded "
        "through `load_causal_lm` and `load_scalar_model`, compared with the model's own forward on "
        "left-padded prompts and right-padded responses. Written by "
        "`python -m tests.model_zoo_support --write benchmarks/results/model_zoo.md` "
        "(the test `tests/test_model_zoo.py` checks the same).",
        "",
        ", ".join(f"{n} {s}" for s, n in counts.items()),
        "",
        "logits: `fused` = the fused kernel matches; `model` = the model's own output layer in chunks "
        "(something happens between the output layer and the logits). RM/critic class: transformers' "
        "sequence-classification class, or `...WithScalarHead` (the causal LM with a scalar head added).",
        "",
        "| architecture | result | logits | attention | RM/critic class | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        detail = r.detail.replace("|", "/")
        lines.append(
            f"| {r.model_type} | {r.status} | {r.logits_path} | {r.attention} | {r.scalar_class} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    write = None
    if "--write" in argv:
        i = argv.index("--write")
        write, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    t0 = time.perf_counter()
    results = run(
        argv or None,
        progress=lambda r: print(
            f"{r.model_type:28s} {r.status:18s} {r.seconds:5.1f}s {r.detail}", flush=True
        ),
    )
    print(f"{len(results)} architectures in {time.perf_counter() - t0:.0f}s")
    if write:
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(markdown(results))
    return int(any(r.status in ("wrong", "crash") for r in results))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
