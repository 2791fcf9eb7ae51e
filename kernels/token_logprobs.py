"""PLACEHOLDER: being written."""


def token_logprobs(logits, ids, *, temperature=1.0, return_entropy=False):
    raise NotImplementedError
