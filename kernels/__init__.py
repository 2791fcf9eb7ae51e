"""fastrlhf.kernels: fused Triton kernels for the hot numerical paths of PPO-based RLHF.

Every op has a readable PyTorch reference (``<op>_reference`` in its module, the executable spec), a Triton
implementation, and dispatch: CUDA tensors run Triton; CPU tensors run PyTorch unless ``TRITON_INTERPRET=1``;
``FASTRLHF_KERNELS=torch|triton`` forces a backend.
"""

if __name__ == "fastrlhf.kernels":
    from .gae import gae
    from .group_advantages import group_advantages
    from .kl_penalty import kl_penalty
    from .linear_token_logprobs import linear_token_logprobs
    from .sample_tokens import sample_tokens
    from .shape_rewards import PPOAdvantages, ppo_advantages, shape_rewards
    from .token_logprobs import token_logprobs
    from .whiten import masked_mean, masked_var, masked_whiten

    __all__ = [
        "PPOAdvantages",
        "gae",
        "group_advantages",
        "kl_penalty",
        "linear_token_logprobs",
        "masked_mean",
        "masked_var",
        "masked_whiten",
        "ppo_advantages",
        "sample_tokens",
        "shape_rewards",
        "token_logprobs",
    ]
else:
    # Imported as a top-level `kernels` because the working directory is the repository root. That name is
    # Hugging Face's package, which transformers and bitsandbytes probe for. Stay an empty module with no
    # __file__: transformers then reads it as "not installed", and `from kernels import x` fails cleanly.
    del __file__
    __all__ = []
