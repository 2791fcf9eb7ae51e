"""PLACEHOLDER: being written."""


def shape_rewards(scores, logp, ref_logp, mask, *, kl_coef, estimator="k1"):
    raise NotImplementedError


def ppo_advantages(
    scores, logp, ref_logp, values, mask, *, kl_coef, estimator="k1", gamma=1.0, lam=0.95, whiten=True
):
    raise NotImplementedError
